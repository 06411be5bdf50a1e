"""A static HTML report of a run: the paper's tables measured, and its figures for a few classes.

One self-contained file (images embedded as PNG data URIs), so it opens from disk or straight from
object storage in a browser:

- accuracy of the black box and of the prototype model, max |logit difference| (exactness);
- Table 3 (NMF only / residual only / NMF + residual, every p), Table 4 (intervention);
- part localization against ground-truth masks, when the data has them;
- Table 1 / Figure 5 (reconstruction errors against p, NMF vs real patches) and seed stability,
  when a reconstruction study was run;
- for a few classes, Figures 2–3: a legend, the coefficients and mean contributions, and one
  panel per prototype in its own colour: its heatmap in held-out images with its contribution to
  each logit, and its gallery (the training patches where it is most present,
  :mod:`protonmf.prototypes.gallery`); the residual prototype's heatmaps; Figure 4: the same
  image at every p, with a legend.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import matplotlib.patches
import matplotlib.pyplot as plt
import torch

from protonmf.data import ImageSource, Preprocess, load_images
from protonmf.prototypes.gallery import class_patches
from protonmf.viz.prototype_figures import (
    colour_hex, error_curves, patch_strip, presence_strip, prototype_colour, prototype_overlay, residual_overlay,
)
from protonmf.prototypes.model import PrototypeModel
from protonmf.storage import class_of_stem
from protonmf.viz.png import LABEL_PT, figure_png, png_data_uri
from protonmf.viz.summaries import agreement_words, evaluation_tables, prototype_agreement

__all__ = ["render_craft_page", "render_report"]

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
h2{border-bottom:1px solid #ddd;padding-bottom:4px}.note{color:#666;font-size:90%}
.legend{margin:.4em 0}.legend .entry{margin-right:1.4em;white-space:nowrap}
.swatch{display:inline-block;width:.9em;height:.9em;margin-right:.35em;vertical-align:-.1em;border-radius:2px}
.prototype-panel{margin:.6em 0;padding:.3em .6em;background:#fafafa}.prototype-panel.residual{border-left:8px solid #404040}
.panel-head{font-weight:600;margin-bottom:.2em}.panel-body{display:flex;flex-wrap:wrap;gap:1.2em;align-items:flex-end}
.intro{background:#f6f8fa;padding:.2em 1em;border-radius:4px;line-height:1.45}
"""


def _png(fig, tight: bool = False) -> str:
    return png_data_uri(figure_png(fig, tight=tight))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], formats: Sequence[str] = ()) -> str:
    """An HTML table; ``formats``: each column's ``format`` spec ("" or none given: floats to 3 places)."""
    def cell(v: Any, fmt: str) -> str:
        if fmt and isinstance(v, (int, float)):
            return format(v, fmt)
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v, formats[i] if i < len(formats) else '')}</td>" for i, v in enumerate(row))
                   + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


#: How to read the report, above everything else.
INTRODUCTION = """<div class='intro'>
<p>This model gives exactly the black box's logits, and says where they come from. For each
class it has a few <b>prototypes</b>: parts of the class's feature maps, found by non-negative
matrix factorization of its training images' features (ProtoNMF). Each prototype has a
<b>coefficient a</b>, fitted so that the prototypes together rebuild the black box's classifier
row for the class; what they do not rebuild is the <b>residual</b>. A prototype's
<b>contribution</b> to an image's logit is its coefficient times how strongly the prototype is
present in the image (the numbers above each heatmap); the contributions plus the bias are the
logit, exactly.</p>
<p>The residual is spread over the prototypes (<code>prototypes.residual</code>: in proportion
to their coefficients, <code>equal</code>, or shaped like their heatmaps, <code>distributed</code>),
so its share is inside their contributions; its own heatmap is drawn after the prototypes, to
show where it lies. A coefficient can be <b>negative</b>: the coefficients are a least-squares fit
of the classifier row, not a vote, and a prototype whose presence lowers the class's logit gets a
negative one. Each class's panels read: one colour per prototype, its heatmap on held-out images
(where the model finds it, with its contribution to each logit), and its gallery (the training
patches where it is most present). Heatmap and gallery are one map: each image's non-negative codes
against the class's prototypes, drawn on held-out images and ranked over the training images.</p></div>"""


def _class_images(source: ImageSource, pre: Preprocess, k: int, n: int) -> torch.Tensor:
    return load_images(source, pre, source.records_of(k)[: 2 * n], workers=0)[0][:n]


def _class_figures(model: PrototypeModel, images: torch.Tensor, pre: Preprocess, k: int,
                   agreement: Sequence[float | None] | None = None) -> str:
    """Figures 2–3 of class k: a legend, the coefficients, and one panel per prototype (its heatmap
    in n held-out images in its colour with its contribution to each logit, and its gallery), then
    the residual prototype's heatmaps."""
    exp = model.explain(images, target=[k] * len(images))
    shown = pre.undo(images)
    heat, contrib = exp.heatmaps.numpy(), exp.contributions.numpy()
    coef = model.C[k].cpu().numpy()
    patches = class_patches(model.gallery(), k, model.p) if model.has_gallery else None
    name = html.escape(model.class_names[k])
    legend = "".join(
        f"<span class='entry'><span class='swatch' style='background:{colour_hex(i)}'></span>prototype {i}: "
        f"a = {coef[i]:.3g}, contribution {contrib[:, i].mean():+.3g}</span>" for i in range(model.p))
    parts = [f"<h3>{name}</h3>",
             f"<div class='legend' data-class='{k}'>{legend}</div>",
             f'<img alt="coefficients of class {k}" src="{_png(_coefficients(model, k, contrib))}">']
    for i in range(model.p):
        colour = colour_hex(i)
        agrees = agreement_words(agreement, i)
        gallery = (f'<img alt="prototype {i} of class {k}: top training patches" '
                   f'src="{_png(patch_strip(patches[i], prototype_colour(i), len(patches[i])), tight=True)}">'
                   if patches and patches[i] else "<span class='note'>no gallery</span>")
        parts.append(
            f"<div class='prototype-panel' data-prototype='{i}' style='border-left:8px solid {colour}'>"
            f"<div class='panel-head' style='color:{colour}'><span class='swatch' style='background:{colour}'></span>"
            f"prototype {i} · coefficient a = {coef[i]:.3g} · mean contribution to the logit {contrib[:, i].mean():+.3g}{agrees}</div>"
            f"<div class='panel-body'><div><div class='note'>where it is, in {len(images)} held-out images "
            f"(contribution to each logit above)</div>"
            f'<img alt="prototype {i} of class {k}: presence" '
            f'src="{_png(presence_strip(shown, heat[:, i], prototype_colour(i), contrib[:, i]), tight=True)}"></div>'
            f"<div><div class='note'>where the same map is largest in training</div>{gallery}</div></div></div>")
    fig, axes = plt.subplots(1, len(images), figsize=(1.25 * len(images), 1.45), squeeze=False)
    residual_top = float(exp.residual_heatmap.max())  # one scale over the images, as each prototype's
    for j, ax in enumerate(axes[0]):
        ax.imshow(residual_overlay(shown[j], exp.residual_heatmap[j].numpy(), vmax=residual_top))
        if not bool(model.spread[k]):
            ax.set_title(f"{float(exp.residual[j]):+.3g}", fontsize=LABEL_PT)
        ax.axis("off")
    fig.tight_layout(pad=0.3)
    spread = ("spread over the prototypes (its share is inside their contributions)" if bool(model.spread[k])
              else "its own term of the logit (contribution above each image)")
    parts.append(f"<div class='prototype-panel residual'><div class='panel-head'>residual prototype: {spread}</div>"
                 f'<img alt="residual prototype of class {k}" src="{_png(fig, tight=True)}"></div>')
    return "".join(parts)


def _coefficients(model: PrototypeModel, k: int, contributions) -> Any:
    """Class k's coefficients a_i and mean contributions, one bar each in the prototype's colour."""
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 0.6 + 0.35 * model.p), sharey=True)
    labels = [f"prototype {i}" for i in range(model.p)]
    colours = [prototype_colour(i) for i in range(model.p)]
    for ax, values, what in ((axes[0], model.C[k].cpu().numpy(), "coefficients a_i"),
                             (axes[1], contributions.mean(0), "mean contribution to the logit")):
        ax.barh(labels, values, color=colours)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(what, fontsize=LABEL_PT)
        ax.tick_params(labelsize=LABEL_PT)
    axes[0].invert_yaxis()
    fig.tight_layout()
    return fig


def _figure4(model: PrototypeModel, images: torch.Tensor, labels: Sequence[int], pre: Preprocess) -> str:
    ps = model.available_p
    shown = pre.undo(images)
    fig, axes = plt.subplots(len(images), len(ps), figsize=(1.8 * len(ps), 1.8 * len(images)), squeeze=False)
    for j, p in enumerate(ps):
        exp = model.with_p(p).explain(images, target=list(labels))
        for i in range(len(images)):
            axes[i, j].imshow(prototype_overlay(shown[i], exp.heatmaps[i].numpy(), alpha=0.75))
            axes[i, j].axis("off")
        axes[0, j].set_title(f"p = {p}", fontsize=LABEL_PT)
    handles = [matplotlib.patches.Patch(color=prototype_colour(i), label=f"prototype {i}") for i in range(min(max(ps), 10))]
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=min(len(handles), 5), fontsize=LABEL_PT, frameon=False)
    return f'<img alt="figure 4: prototype areas for p in {ps}" src="{_png(fig, tight=True)}">'


@torch.no_grad()
def render_report(
    model: PrototypeModel,
    evaluation: dict[str, Any],
    source: ImageSource,
    *,
    reconstruction: dict[int, dict[str, Any]] | None = None,
    classes: Sequence[int] | None = None,
    images_per_class: int = 10,
    title: str = "Prototype model report",
    atlas: str | None = None,
) -> str:
    """The report as one HTML string. ``source`` gives the example images (held-out); ``atlas``:
    the link (relative to the report) to the atlas of every class, when one is written.

    The model stays where it is (its figures are computed there); images are loaded on the CPU and
    the explanations come back there to be drawn (:mod:`protonmf.devices`).
    """
    pre = Preprocess(**model.preprocess) if model.preprocess else Preprocess()
    model = model.eval()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    spec = model.backbone.spec_dict()
    parts.append(f"<p class='note'>backbone {html.escape(str(spec.get('arch')))}, feature layer "
                 f"{html.escape(str(spec.get('feature_layer')))}, {model.num_classes} classes, p = {model.available_p}</p>")
    parts.append(INTRODUCTION)
    if atlas:
        parts.append(f"<p>Every class's prototypes: <a href='{html.escape(atlas)}'>the prototype atlas</a> "
                     f"(searchable, one page per class); below, {len(classes) if classes is not None else min(3, model.num_classes)} "
                     "of them in detail.</p>")
    parts.extend(_evaluation_tables(evaluation, model.p))
    if reconstruction:
        parts.append(_reconstruction_section(reconstruction))
    chosen = list(classes) if classes is not None else list(range(min(3, model.num_classes)))
    parts.extend(_class_sections(model, source, pre, chosen, images_per_class, evaluation))
    parts.append("</body></html>")
    return "\n".join(parts)


def _by_p(table: dict) -> list[tuple[Any, Any]]:
    return sorted(table.items(), key=lambda kv: int(kv[0]))


def _evaluation_tables(evaluation: dict[str, Any], p: int) -> list[str]:
    """Accuracy and exactness, Table 3, Table 4, part localization and consistency and stability
    (when measured): :func:`~protonmf.viz.summaries.evaluation_tables`, each with its heading."""
    parts = []
    for t in evaluation_tables(evaluation, p):
        if t.empty:  # nothing to say: said in one line
            paper = f" <span class='note'>(the paper's {t.paper})</span>" if t.paper else ""
            parts.append(f"<h2>{t.heading}</h2><p>{t.empty}{paper}</p>")
            continue
        said = "; ".join(x for x in (t.note, f"the paper's {t.paper}" if t.paper else "") if x)
        note = f"<p class='note'>{said}</p>" if said else ""
        footer = f"<p>{t.footer}</p>" if t.footer else ""
        parts.append(f"<h2>{t.heading}</h2>{note}{_table(t.header, t.rows, t.formats)}{footer}")
    return parts


def _reconstruction_section(reconstruction: dict[int, dict[str, Any]]) -> str:
    """Table 1 and Figure 5: reconstruction errors against p, NMF against real patches, and stability."""
    rows = _by_p(reconstruction)

    def ms(v: dict[str, float]) -> str:
        return f"{v['mean']:.3f} ± {v['std']:.3f}"

    table = _table(
        ["p", "features, NMF", "features, real patches", "head, NMF", "head, real patches", "stability (cosine)"],
        [[p, ms(v["feature_error"]), ms(v["baseline_feature_error"]), ms(v["head_error"]),
          ms(v["baseline_head_error"]), ms(v["stability"])] for p, v in rows])
    fig = error_curves([int(p) for p, _ in rows], {
        "features, NMF": [(v["feature_error"]["mean"], v["feature_error"]["std"]) for _, v in rows],
        "features, real patches": [(v["baseline_feature_error"]["mean"], v["baseline_feature_error"]["std"]) for _, v in rows],
        "head, NMF": [(v["head_error"]["mean"], v["head_error"]["std"]) for _, v in rows],
    })
    return ("<h2>How well the prototypes rebuild the features and the head</h2><p class='note'>relative errors "
            "against p, NMF against real patches, and the prototypes' stability across seeds; the paper's Table 1 "
            f"and Figure 5</p>{table}"
            f'<img alt="figure 5: reconstruction errors against p" src="{_png(fig)}">')


def _class_sections(model: PrototypeModel, source: ImageSource, pre: Preprocess, chosen: list[int], n: int,
                    evaluation: dict[str, Any]) -> list[str]:
    """Figures 2–3 for each chosen class (with each prototype's agreement, when measured), then
    Figure 4 on the first image of each."""
    parts = [f"<h2>The prototypes of {len(chosen)} of the {model.num_classes} classes (p = {model.p})</h2>"
             "<p class='note'>the paper's Figures 2–3</p>"]
    firsts, first_labels = [], []
    for k in chosen:
        images = _class_images(source, pre, k, n)
        if len(images) == 0:
            parts.append(f"<p>class {html.escape(model.class_names[k])}: no readable images</p>")
            continue
        parts.append(_class_figures(model, images, pre, k, prototype_agreement(evaluation, model.p, k)))
        firsts.append(images[0])
        first_labels.append(k)
    if firsts:
        parts.append("<h2>The same images with more prototypes</h2><p class='note'>each prototype's area, one colour "
                     "each, for every fitted p; the paper's Figure 4</p>" + _figure4(model, torch.stack(firsts), first_labels, pre))
    return parts


def render_craft_page(summary: dict[str, Any], class_names: Sequence[str], figures: Sequence[str], title: str) -> str:
    """The CRAFT artifact's ``index.html``: its summary tables and its figures (``figures/…`` beside it)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='note'>{summary['classes']} classes with concepts, {summary['sub_banks']} sub-concept banks, "
             f"{len(summary['skipped_classes'])} classes without predicted images</p>"]
    levels = [(summary[key], what) for key, what in (("fidelity", "root"), ("sub_fidelity", "sub-concept")) if key in summary]
    if levels:
        parts.append("<h2>Fidelity in concept space (CRAFT Fig. 5)</h2>" + _table(
            ["banks", "ranking", "deletion AUC (lower is better)", "insertion AUC (higher is better)", "deletion lower in (share of banks)"],
            [[what, r, f[r]["deletion_auc"], f[r]["insertion_auc"], f[f"{r}_deletion_lower"]]
             for f, what in levels for r in ("sobol", "tcav")]))
    if summary.get("localization"):
        parts.append("<h2>Concept localization against part masks</h2>" + _table(
            ["map", "peak on object", "purity", "parts covered", "IoU"],
            [[m, v["on_object"], v["purity"], v["coverage"], v["iou"]] for m, v in summary["localization"].items()]))
    by_class: dict[str, list[str]] = {}
    for name in sorted(figures):
        k = class_of_stem(name.rsplit("/", 1)[-1].split("_", 1)[0])
        by_class.setdefault("all classes" if k is None else class_names[k], []).append(name)
    for label, names in by_class.items():
        parts.append(f"<h2>{html.escape(label)}</h2>" + "".join(
            f'<img alt="{html.escape(n.rsplit("/", 1)[-1][:-4])}" src="{html.escape(n)}"><br>' for n in names))
    parts.append("</body></html>")
    return "\n".join(parts)
