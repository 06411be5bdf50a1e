"""The evaluation's three renderings: run summary and terminal lines as the references below write them, to the byte; the HTML tables.

The references below are copies of the code that rendered an evaluation before
:mod:`protonmf.viz.summaries` existed: ``flows/build.py`` (``_localization_table``,
``_interpretability_table`` and the evaluation part of ``_report``), ``flows/cli.py``
(``_print_result``). The HTML report's tables are checked as they now read.
"""

from __future__ import annotations

import copy
import json

import pytest

from protonmf.viz.report import _evaluation_tables
from protonmf.viz.summaries import (
    evaluation_lines,
    evaluation_markdown,
    evaluation_tables,
    interpretability_markdown,
    localization_markdown,
)

FULL = {
    "n_images": 40, "n_skipped": 1, "top1_black_box": 0.875, "top1_prototype": 0.8625,
    "max_abs_logit_diff": 1.234e-6, "max_abs_logit": 12.3456, "report": "file:///tmp/run/report/index.html",
    "table3": {5: {"nmf_only": 0.8125, "residual_only": 0.125, "augmented": 0.875},
               3: {"nmf_only": 0.75, "residual_only": 0.2, "augmented": 0.8625}},
    "intervention": {3: {"top1_before": 0.8625, "top1_after": 0.9, "fixed": 3},
                     5: {"top1_before": 0.875, "top1_after": 0.925, "fixed": 2}},
    "localization": {5: {"on_object": 0.9125, "purity": 0.71875, "coverage": 1.5, "iou": 0.3125},
                     3: {"on_object": 0.8875, "purity": 0.6, "coverage": 1.25, "iou": 0.28125}},
    "consistency": {3: {"codes": 81.25, "presence": 76.5, "activation": 61.25}, 5: {"codes": 77.5, "presence": 70.0, "activation": 66.66666}},
    "stability": {3: {"codes": 93.75, "presence": 94.25, "activation": 95.5}, 5: {"codes": 91.25, "presence": 92.5, "activation": 90.0}},
}
# no part masks, no keypoints: no localization, no consistency or stability
SPARSE = {k: v for k, v in FULL.items() if k not in ("localization", "consistency", "stability", "report")}
# as ``protonmf evaluate --json`` writes them: p keys are strings
CASES = {"full": FULL, "sparse": SPARSE, "full-json": json.loads(json.dumps(FULL)),
         "sparse-json": json.loads(json.dumps(SPARSE)), "empty-sections": {**FULL, "localization": {}, "consistency": {}}}


# ---- reference: flows/build.py before the move ----

def _localization_table(evaluation: dict) -> str:
    loc = evaluation.get("localization") or {}
    if not loc:
        return ""
    rows = "\n".join(
        f"| {p} | {m['on_object']:.3f} | {m['purity']:.3f} | {m['coverage']:.2f} | {m['iou']:.3f} |"
        for p, m in sorted(loc.items(), key=lambda kv: int(kv[0]))
    )
    return (
        "Part localization against the ground-truth part masks (peaks of each prototype's heatmap):\n\n"
        "| p | peak on object | purity | parts covered | IoU |\n|---|---|---|---|---|\n" + rows + "\n"
    )


def _interpretability_table(evaluation: dict) -> str:
    con, sta = evaluation.get("consistency") or {}, evaluation.get("stability") or {}
    if not con:
        return ""
    rows = "\n".join(
        f"| {p} | {con[p]['codes']:.1f} | {sta[p]['codes']:.1f} | {con[p]['presence']:.1f} | {con[p]['activation']:.1f} |"
        for p in sorted(con, key=int)
    )
    return (
        "Consistency and stability against part keypoints (Huang et al. 2023, % of prototypes):\n\n"
        "| p | consistency | stability | consistency (eq. 9) | consistency (F·p̃ᵀ) |\n"
        "|---|---|---|---|---|\n" + rows + "\n"
    )


def _old_summary(evaluation: dict) -> str:
    """``_report``'s markdown from its report line to its classes line (the run's other numbers made up)."""
    table3 = "\n".join(
        f"| {p} | {v['nmf_only']:.3f} | {v['residual_only']:.3f} | {v['augmented']:.3f} |"
        for p, v in sorted(evaluation["table3"].items(), key=lambda kv: int(kv[0]))
    )
    return f"""Report: `{evaluation.get('report', 'not written')}`.

| | top-1 (held-out, {evaluation['n_images']} images) |
|---|---|
| black box | {evaluation['top1_black_box']:.4f} |
| prototype model | {evaluation['top1_prototype']:.4f} |

Max |logit difference| prototype model vs black box: {evaluation['max_abs_logit_diff']:.2e}
(max |logit| {evaluation['max_abs_logit']:.2f}).

| p | NMF only | residual only | NMF + residual |
|---|---|---|---|
{table3}

{_localization_table(evaluation)}
{_interpretability_table(evaluation)}
Classes: 7 done (0 resumed from an earlier run); images used 40, skipped 1.
"""


def _new_summary(evaluation: dict) -> str:
    """The same with :func:`evaluation_markdown`, as ``flows/build.py`` is to call it."""
    return f"""Report: `{evaluation.get('report', 'not written')}`.

{evaluation_markdown(evaluation)}
Classes: 7 done (0 resumed from an earlier run); images used 40, skipped 1.
"""


# ---- reference: flows/cli.py before the move ----

def _print_result(result: dict) -> None:
    ev = result["evaluation"]
    print()
    print(f"model:            {result['model']}")
    if ev.get("report"):
        print(f"report:           {ev['report']}")
    print(f"classes:          {result['classes']}")
    print(f"black box top-1:  {ev['top1_black_box']:.4f}  ({ev['n_images']} held-out images)")
    print(f"prototype top-1:  {ev['top1_prototype']:.4f}  (max |logit diff| {ev['max_abs_logit_diff']:.2e})")
    for p, modes in sorted(ev["table3"].items(), key=lambda kv: int(kv[0])):
        print(f"  p={p:<3} NMF only {modes['nmf_only']:.4f}   residual only {modes['residual_only']:.4f}   NMF+residual {modes['augmented']:.4f}")
    for p, m in sorted((ev.get("localization") or {}).items(), key=lambda kv: int(kv[0])):
        print(f"  p={p:<3} part localization: peak on object {m['on_object']:.3f}, purity {m['purity']:.3f}, "
              f"parts covered {m['coverage']:.2f} of 3, IoU {m['iou']:.3f}")
    stab = ev.get("stability") or {}
    for p, m in sorted((ev.get("consistency") or {}).items(), key=lambda kv: int(kv[0])):
        print(f"  p={p:<3} consistency {m['codes']:.1f}%, stability {stab[p]['codes']:.1f}% "
              f"(eq. 9: {m['presence']:.1f}%, F·p̃ᵀ: {m['activation']:.1f}%)")


# ---- the run summary ----

@pytest.mark.parametrize("case", sorted(CASES))
def test_markdown_is_the_flows_summary(case):
    evaluation = CASES[case]
    assert localization_markdown(evaluation) == _localization_table(evaluation)
    assert interpretability_markdown(evaluation) == _interpretability_table(evaluation)
    assert _new_summary(evaluation) == _old_summary(evaluation)


def test_markdown_lines():
    text = evaluation_markdown(FULL)
    assert text.startswith("| | top-1 (held-out, 40 images) |\n|---|---|\n| black box | 0.8750 |\n| prototype model | 0.8625 |\n\n"
                           "Max |logit difference| prototype model vs black box: 1.23e-06\n(max |logit| 12.35).\n\n")
    assert ("| p | NMF only | residual only | NMF + residual |\n|---|---|---|---|\n"
            "| 3 | 0.750 | 0.200 | 0.863 |\n| 5 | 0.812 | 0.125 | 0.875 |\n\n") in text
    assert ("| p | peak on object | purity | parts covered | IoU |\n|---|---|---|---|---|\n"
            "| 3 | 0.887 | 0.600 | 1.25 | 0.281 |\n| 5 | 0.912 | 0.719 | 1.50 | 0.312 |\n\n") in text
    assert text.endswith("|---|---|---|---|---|\n| 3 | 81.2 | 93.8 | 76.5 | 61.2 |\n| 5 | 77.5 | 91.2 | 70.0 | 66.7 |\n")
    assert "Table 4" not in text and "top-1 before" not in text


def test_markdown_without_localization_or_consistency():
    assert localization_markdown(SPARSE) == interpretability_markdown(SPARSE) == ""
    assert evaluation_markdown(SPARSE).endswith("| 3 | 0.750 | 0.200 | 0.863 |\n| 5 | 0.812 | 0.125 | 0.875 |\n\n\n")
    assert interpretability_markdown({"table3": {}}) == ""


# ---- the terminal ----

@pytest.mark.parametrize("case", sorted(CASES))
def test_lines_are_the_clis(case, capsys):
    result = {"model": "file:///tmp/run/model", "classes": 7, "evaluation": CASES[case]}
    _print_result(result)
    old = capsys.readouterr().out
    from flows.cli import _print_result as new_print_result  # what the command line prints now

    new_print_result(result)
    assert capsys.readouterr().out == old


def test_lines():
    assert evaluation_lines(FULL) == [
        "black box top-1:  0.8750  (40 held-out images)",
        "prototype top-1:  0.8625  (max |logit diff| 1.23e-06)",
        "  p=3   NMF only 0.7500   residual only 0.2000   NMF+residual 0.8625",
        "  p=5   NMF only 0.8125   residual only 0.1250   NMF+residual 0.8750",
        "  p=3   part localization: peak on object 0.887, purity 0.600, parts covered 1.25 of 3, IoU 0.281",
        "  p=5   part localization: peak on object 0.912, purity 0.719, parts covered 1.50 of 3, IoU 0.312",
        "  p=3   consistency 81.2%, stability 93.8% (eq. 9: 76.5%, F·p̃ᵀ: 61.2%)",
        "  p=5   consistency 77.5%, stability 91.2% (eq. 9: 70.0%, F·p̃ᵀ: 66.7%)",
    ]
    assert evaluation_lines(SPARSE) == evaluation_lines(FULL)[:4]


# ---- the HTML report ----

def test_html_tables_read_as_people_read():
    """Plain headings with the paper's names in a note, numbers in each column's own format
    (percentages to one place), and a table with nothing to say said in one line."""
    html = "".join(_evaluation_tables(FULL, 3))
    assert ("<h2>Which prototypes carry the decision</h2><p class='note'>top-1 of the model with the prototypes alone "
            "(NMF only), the residual alone, and both (the exact model); the paper's Table 3</p>") in html
    assert "<tr><td>3</td><td>0.750</td><td>0.200</td><td>0.863</td></tr>" in html
    assert "<tr><td>3</td><td>0.863</td><td>0.900</td><td>3</td></tr>" in html  # Table 4: top-1s, and a count
    assert "<tr><td>3</td><td>81.2</td><td>93.8</td><td>76.5</td><td>61.2</td></tr>" in html  # percentages
    assert "<tr><td>black box</td><td>0.8750</td></tr>" in html and "70.0000" not in html
    perfect = {**FULL, "intervention": {3: {"top1_before": 1.0, "top1_after": 1.0, "fixed": 0}}}
    assert ("<h2>Removing a prototype (test-time intervention)</h2><p>The black box makes no mistake on these held-out "
            "images: there is nothing for removing a prototype to correct. <span class='note'>(the paper's Table 4)</span></p>"
            ) in "".join(_evaluation_tables(perfect, 3))


def test_tables():
    tables = evaluation_tables(FULL, 3)
    assert [t.heading for t in tables] == ["Accuracy", "Which prototypes carry the decision",
                                           "Removing a prototype (test-time intervention)", "Part localization",
                                           "Consistency and stability"]
    assert [t.paper for t in tables] == ["", "Table 3", "Table 4", "", ""]
    accuracy = tables[0]
    assert accuracy.header == ["", "top-1 (40 held-out images)"]
    assert accuracy.rows == [["black box", 0.875], ["prototype model (p = 3)", 0.8625]]
    assert accuracy.footer == "max |logit difference| 1.23e-06 (max |logit| 12.346)"
    assert tables[2].rows == [[3, 0.8625, 0.9, 3], [5, 0.875, 0.925, 2]]
    assert tables[4].rows == [[3, 81.25, 93.75, 76.5, 61.25], [5, 77.5, 91.25, 70.0, 66.66666]]
    heading, header, rows, note, footer, *_ = tables[3]
    assert header == ["p", "peak on object", "purity", "parts covered", "IoU"] and note == footer == ""
    assert evaluation_tables(FULL)[0].rows[1][0] == "prototype model"
    assert [t.heading for t in evaluation_tables(SPARSE, 3)] == [t.heading for t in tables[:3]]
    assert [t.heading for t in evaluation_tables({**SPARSE, "intervention": {}}, 3)] == [t.heading for t in tables[:2]]


def test_renderings_leave_the_evaluation_alone():
    before = copy.deepcopy(FULL)
    evaluation_markdown(FULL), evaluation_lines(FULL), evaluation_tables(FULL, 3)
    assert FULL == before
