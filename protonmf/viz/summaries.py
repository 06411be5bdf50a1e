"""The evaluation of a published model, in words: markdown, terminal lines and tables for HTML.

The one place that knows which tables an evaluation has (the dict of
:func:`protonmf.evaluation.published.finish_evaluation` and ``protonmf evaluate``) and which
rows, columns, keys and number formats each one shows. Three renderings derive from the same
definitions:

- :func:`evaluation_markdown` (with :func:`localization_markdown` and
  :func:`interpretability_markdown`): the evaluation part of the flow's run summary
  (``flows/build.py``);
- :func:`evaluation_lines`: what ``protonmf run`` / ``protonmf demo`` print (``flows/cli.py``);
- :func:`evaluation_tables`: heading, header and raw rows of each table of the HTML report
  (:mod:`protonmf.viz.report`, whose ``_table`` formats the cells).

A per-p section (``table3``, ``localization``, ...) is ``{p: {field: value}}``, its keys ints or,
after a JSON round trip, strings; rows are always in increasing p.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, NamedTuple

__all__ = [
    "EvaluationTable",
    "evaluation_lines",
    "evaluation_markdown",
    "evaluation_tables",
    "interpretability_markdown",
    "localization_markdown",
    "prototype_agreement",
    "agreement_words",
]

# top-1 of the black box and of the prototype model: (label, key), and their format everywhere
_TOP1 = (("black box", "top1_black_box"), ("prototype model", "top1_prototype"))
_TOP1_FORMAT = ".4f"
# max |logit difference| prototype model vs black box (exactness)
_DIFF_FORMAT = ".2e"


@dataclass(frozen=True)
class _Column:
    """One column of a per-p table: ``evaluation[section][p][field]``.

    ``fmt`` formats it in markdown and in terminal lines; ``line_fmt``, when given, in terminal
    lines instead. (HTML cells are formatted by the report.)
    """

    header: str
    section: str
    field: str
    fmt: str = ""
    line_fmt: str | None = None

    def markdown(self, value: Any) -> str:
        return format(value, self.fmt)

    def line(self, value: Any) -> str:
        return format(value, self.fmt if self.line_fmt is None else self.line_fmt)


@dataclass(frozen=True)
class _PerP:
    """A table with one row per p; its rows are the p of its first column's section.

    Attributes
    ----------
    heading : the HTML report's heading.
    columns : the columns after p.
    required : shown even when its section is empty (a missing section is an error); otherwise
        shown only when its section is there and not empty.
    intro : the markdown sentence above the table.
    note : the HTML report's note under the heading.
    line : the terminal line of one p (after ``p=…``), ``str.format`` of the columns' values
        formatted, in column order.
    paper : the paper's name of the table (the report's note names it), or "".
    """

    heading: str
    columns: tuple[_Column, ...]
    required: bool = False
    intro: str = ""
    note: str = ""
    line: str = ""
    paper: str = ""

    def section(self, evaluation: dict[str, Any], name: str) -> dict:
        return evaluation[name] if self.required else (evaluation.get(name) or {})

    def rows(self, evaluation: dict[str, Any]) -> list[tuple[Any, list[Any]]]:
        """``(p, [value of each column])`` in increasing p."""
        ps = sorted(self.section(evaluation, self.columns[0].section), key=int)
        return [(p, [self.section(evaluation, c.section)[p][c.field] for c in self.columns]) for p in ps]

    def shown(self, evaluation: dict[str, Any]) -> bool:
        return self.required or bool(evaluation.get(self.columns[0].section))


_TABLE3 = _PerP(
    "Which prototypes carry the decision",
    (_Column("NMF only", "table3", "nmf_only", ".3f", ".4f"),
     _Column("residual only", "table3", "residual_only", ".3f", ".4f"),
     _Column("NMF + residual", "table3", "augmented", ".3f", ".4f")),
    required=True,
    line="NMF only {0}   residual only {1}   NMF+residual {2}",
    note="top-1 of the model with the prototypes alone (NMF only), the residual alone, and both (the exact model)",
    paper="Table 3",
)
_INTERVENTION = _PerP(
    "Removing a prototype (test-time intervention)",
    (_Column("top-1 before", "intervention", "top1_before", ".3f"),
     _Column("top-1 after", "intervention", "top1_after", ".3f"),
     _Column("corrected", "intervention", "fixed", "d")),
    note="each wrong prediction loses its predicted class's most important prototype",
    paper="Table 4",
)
_LOCALIZATION = _PerP(
    "Part localization",
    (_Column("peak on object", "localization", "on_object", ".3f"),
     _Column("purity", "localization", "purity", ".3f"),
     _Column("parts covered", "localization", "coverage", ".2f"),
     _Column("IoU", "localization", "iou", ".3f")),
    intro="Part localization against the ground-truth part masks (peaks of each prototype's heatmap):",
    line="part localization: peak on object {0}, purity {1}, parts covered {2} of 3, IoU {3}",
)
_AGREEMENT = _PerP(
    "Do the gallery and the heatmaps agree",
    (_Column("agreement", "agreement", "score", ".1f"),
     _Column("prototypes with a gallery", "agreement", "n_prototypes", "d")),
    intro="Agreement of each prototype's gallery with its heatmaps (% of gallery patches on the part its "
          "held-out heatmaps peak on most often):",
    note="% of a prototype's gallery patches (training) that lie on the part where its heatmaps (held-out) peak "
         "most often, the part of a patch being the part mask's label at its cell's centre; mean over "
         "the prototypes that have a gallery",
    line="gallery on the heatmaps' part {0}% ({1} prototypes)",
)
_INTERPRETABILITY = _PerP(
    "Consistency and stability",
    (_Column("consistency", "consistency", "codes", ".1f"),
     _Column("stability", "stability", "codes", ".1f"),
     _Column("consistency (eq. 9)", "consistency", "presence", ".1f"),
     _Column("consistency (F·p̃ᵀ)", "consistency", "activation", ".1f")),
    intro="Consistency and stability against part keypoints (Huang et al. 2023, % of prototypes):",
    note="% of prototypes (Huang et al. 2023), from the heatmaps the report draws (each image's codes against "
         "the NMF prototypes, the gallery's definition): a prototype is consistent if one part falls in the 72 px box "
         "(at 224 px) around its peak in ≥ 80% of its class's images where the part is visible; stable: share "
         "of images whose parts in the box are unchanged under noise. The last two columns read the prototype "
         "elsewhere: eq. 9's presence against the augmented prototypes, and its share of the head F·p̃ᵀ",
    line="consistency {0}%, stability {1}% (eq. 9: {2}%, F·p̃ᵀ: {3}%)",
)


# ---- markdown (the flow's run summary) ----

def _markdown_table(table: _PerP, evaluation: dict[str, Any]) -> str:
    """Header, rule and rows, one line each, without a newline after the last."""
    header = "| " + " | ".join(["p"] + [c.header for c in table.columns]) + " |"
    rule = "|" + "---|" * (1 + len(table.columns))
    rows = "\n".join("| " + " | ".join([f"{p}"] + [c.markdown(v) for c, v in zip(table.columns, values)]) + " |"
                     for p, values in table.rows(evaluation))
    return f"{header}\n{rule}\n{rows}"


def _markdown_section(table: _PerP, evaluation: dict[str, Any]) -> str:
    if not table.shown(evaluation):
        return ""
    return f"{table.intro}\n\n{_markdown_table(table, evaluation)}\n"


def localization_markdown(evaluation: dict[str, Any]) -> str:
    """The part localization table of the flow's run summary (``flows/build.py``), with its
    sentence and a final newline; ``""`` when the evaluation has no localization."""
    return _markdown_section(_LOCALIZATION, evaluation)


def interpretability_markdown(evaluation: dict[str, Any]) -> str:
    """The consistency and stability table of the flow's run summary (``flows/build.py``), with
    its sentence and a final newline; ``""`` when the evaluation has no consistency."""
    return _markdown_section(_INTERPRETABILITY, evaluation)


def _top1_markdown(evaluation: dict[str, Any]) -> str:
    rows = "".join(f"| {label} | {evaluation[key]:{_TOP1_FORMAT}} |\n" for label, key in _TOP1)
    return f"| | top-1 (held-out, {evaluation['n_images']} images) |\n|---|---|\n{rows}"


def _exactness_markdown(evaluation: dict[str, Any]) -> str:
    return (f"Max |logit difference| prototype model vs black box: {evaluation['max_abs_logit_diff']:{_DIFF_FORMAT}}\n"
            f"(max |logit| {evaluation['max_abs_logit']:.2f}).")


def evaluation_markdown(evaluation: dict[str, Any]) -> str:
    """The evaluation part of the flow's run summary (``flows/build.py``, ``_report``).

    The top-1 table, a blank line, the max |logit difference| sentence (two lines), a blank line,
    Table 3, a blank line, :func:`localization_markdown`, a newline and
    :func:`interpretability_markdown`: in ``_report``'s f-string it stands for everything from
    ``| | top-1 (held-out, …`` to ``{_interpretability_table(evaluation)}``, the line break after
    that staying in the f-string.
    """
    agreement = _markdown_section(_AGREEMENT, evaluation)
    return (f"{_top1_markdown(evaluation)}\n{_exactness_markdown(evaluation)}\n\n"
            f"{_markdown_table(_TABLE3, evaluation)}\n\n"
            f"{localization_markdown(evaluation)}{agreement and chr(10) + agreement}\n{interpretability_markdown(evaluation)}")


# ---- terminal lines (the command line) ----

def _per_p_lines(table: _PerP, evaluation: dict[str, Any]) -> list[str]:
    return [f"  p={p:<3} " + table.line.format(*(c.line(v) for c, v in zip(table.columns, values)))
            for p, values in table.rows(evaluation)]


def evaluation_lines(evaluation: dict[str, Any]) -> list[str]:
    """What ``protonmf run`` / ``protonmf demo`` print of the evaluation (``flows/cli.py``,
    ``_print_result``), one string a line, after its model, report and classes lines.

    Top-1 of the black box and of the prototype model (with the max |logit difference|), then
    per p: Table 3, the part localization and the consistency and stability (when measured).
    """
    black_box, prototype = (format(evaluation[key], _TOP1_FORMAT) for _, key in _TOP1)
    return [
        f"black box top-1:  {black_box}  ({evaluation['n_images']} held-out images)",
        f"prototype top-1:  {prototype}  (max |logit diff| {evaluation['max_abs_logit_diff']:{_DIFF_FORMAT}})",
        *_per_p_lines(_TABLE3, evaluation),
        *_per_p_lines(_LOCALIZATION, evaluation),
        *_per_p_lines(_AGREEMENT, evaluation),
        *_per_p_lines(_INTERPRETABILITY, evaluation),
    ]


# ---- tables (the HTML report) ----

class EvaluationTable(NamedTuple):
    """One table of the HTML report: raw cell values, and the format of each column's numbers.

    ``heading``, ``note`` (under the heading) and ``footer`` (under the table) are plain text
    written as they are, ``""`` when there is none; ``paper``: the paper's name of the table;
    ``formats``: one ``format`` spec per column ("" for text or as it is); ``empty``: when the
    table has nothing to say, the one line the report writes instead of it.
    """

    heading: str
    header: list[str]
    rows: list[list[Any]]
    note: str = ""
    footer: str = ""
    paper: str = ""
    formats: list[str] = []
    empty: str = ""


def _accuracy_table(evaluation: dict[str, Any], p: int | None) -> EvaluationTable:
    def label(name: str, key: str) -> str:
        return f"{name} (p = {p})" if key == "top1_prototype" and p is not None else name

    footer = (f"max |logit difference| {evaluation['max_abs_logit_diff']:{_DIFF_FORMAT}} "
              f"(max |logit| {evaluation['max_abs_logit']:.3f})")
    return EvaluationTable("Accuracy", ["", f"top-1 ({evaluation['n_images']} held-out images)"],
                           [[label(name, key), evaluation[key]] for name, key in _TOP1], footer=footer,
                           formats=["", _TOP1_FORMAT])


def _nothing_to_correct(table: _PerP, rows: list[tuple[Any, list[Any]]]) -> str:
    """The intervention's one line when the black box made no mistake to correct, else ""."""
    if table is _INTERVENTION and rows and all(before == 1 and fixed == 0 for _, (before, _after, fixed) in rows):
        return ("The black box makes no mistake on these held-out images: there is nothing for removing a prototype "
                "to correct.")
    return ""


def _per_p_table(table: _PerP, evaluation: dict[str, Any]) -> EvaluationTable:
    rows = table.rows(evaluation)
    return EvaluationTable(table.heading, ["p"] + [c.header for c in table.columns],
                           [[p, *values] for p, values in rows], note=table.note, paper=table.paper,
                           formats=[""] + [c.fmt for c in table.columns], empty=_nothing_to_correct(table, rows))


def evaluation_tables(evaluation: dict[str, Any], p: int | None = None) -> list[EvaluationTable]:
    """The evaluation's tables in the HTML report (:mod:`protonmf.viz.report`, ``_evaluation_tables``).

    Accuracy (with the max |logit difference| as its footer), Table 3, then Table 4, part
    localization and consistency and stability when measured.

    Parameters
    ----------
    evaluation : the evaluation of a published model.
    p : the model's own p, named in the accuracy table's prototype row (``None``: not named).
    """
    shown = [t for t in (_TABLE3, _INTERVENTION, _LOCALIZATION, _AGREEMENT, _INTERPRETABILITY) if t.shown(evaluation)]
    return [_accuracy_table(evaluation, p)] + [_per_p_table(t, evaluation) for t in shown]


def prototype_agreement(evaluation: dict[str, Any], p: int, k: int) -> list[float | None] | None:
    """Each prototype's agreement (%) of class ``k`` at ``p`` from the evaluation, or None if not measured."""
    per_p = (evaluation.get("agreement") or {})
    at_p = per_p.get(p, per_p.get(str(p))) or {}
    per_class = at_p.get("per_class") or {}
    return per_class.get(k, per_class.get(str(k)))


def agreement_words(agreement: Sequence[float | None] | None, i: int) -> str:
    """`` · N% of its gallery on the part …`` for prototype ``i`` (""  where not measured)."""
    if agreement is None or agreement[i] is None:
        return ""
    return f" · {agreement[i]:.0f}% of its gallery on the part its heatmaps peak on most often"
