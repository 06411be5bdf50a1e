"""The prototype atlas: a static site of every class's prototypes, to browse what a run made.

Written beside a published model (``versions/<id>/atlas/``, by the run's evaluation step) or
anywhere by ``protonmf atlas MODEL_URI --out DIR``; it opens from disk or straight from object
storage (relative links only, no server)::

    atlas/index.html              every class (id, name), searchable by name or id, with its
                                  prototype count and links to its pages
    atlas/classes/c00042-p3.html  one page per class and p: each prototype's coefficient a, its
                                  mean contribution to the logit on held-out images, its gallery
                                  (the training patches where it is most present) and a few
                                  held-out heatmaps; links to the class's page at every other p

Pages stay small at ImageNet's size: the index is the class list alone (a few tens of kB for
1,000 classes), a class page holds only its own pictures (JPEG patches as stored in the gallery,
heatmaps as small JPEGs, inline), so a browser loads one class at a time. Anchors: the per-unit
pages of OpenAI Microscope and the feature browsers of sparse-autoencoder toolkits.

The index is written last: an atlas cut off while its pages are written has no index (nothing
to open), and writing it again replaces every page.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from protonmf.data import ImageSource, Preprocess, load_images
from protonmf.prototypes.model import PrototypeModel
from protonmf.storage import class_stem, join, to_fs, write_objects
from protonmf.viz.prototype_figures import colour_hex, presence_overlay, prototype_colour
from protonmf.viz.summaries import agreement_words, prototype_agreement

__all__ = ["atlas_weights", "class_page_name", "write_atlas"]

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
a{color:#0b5cad}input{font-size:1.05em;padding:.35em .6em;width:24em;max-width:100%}
.classes{list-style:none;padding:0;columns:3 18em}.classes li{padding:.15em 0;break-inside:avoid}
.id{color:#888;font-variant-numeric:tabular-nums;margin-right:.4em}.note{color:#666;font-size:90%}
.panel{margin:.8em 0;padding:.4em .8em;background:#fafafa;border-left:8px solid #888}
.panel h3{margin:.2em 0 .4em 0;font-size:1.05em}.row{display:flex;flex-wrap:wrap;gap:4px;align-items:flex-end}
.row img{height:96px;width:auto;image-rendering:auto}.ps a,.ps b{margin-right:.8em}
"""


def class_page_name(k: int, p: int) -> str:
    """The page of class ``k`` at ``p`` prototypes, relative to the atlas's ``classes/`` folder."""
    return f"{class_stem(k)}-p{p}.html"


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>")


def _jpeg_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


#: Classes whose pages are held in memory and written together (their PUTs at once on object stores).
PAGES_AT_ONCE = 32

#: Heatmaps are drawn at most this many pixels a side (a 224 px crop at 128: a few kB each).
HEATMAP_PX = 128


def _jpeg(pixels: np.ndarray, quality: int = 80) -> bytes:
    img = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    img.thumbnail((HEATMAP_PX, HEATMAP_PX))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _index(model: PrototypeModel) -> str:
    ps = model.available_p
    entries = [[k, name] for k, name in enumerate(model.class_names)]
    items = "".join(
        f"<li data-k='{k}' data-name='{html.escape(name.lower())}'><span class='id'>{k}</span>"
        f"<a href='classes/{class_page_name(k, model.p)}'>{html.escape(name)}</a></li>" for k, name in entries)
    script = """<script>
const box = document.getElementById('search'), items = Array.from(document.querySelectorAll('.classes li'));
const count = document.getElementById('count');
box.addEventListener('input', () => {
  const q = box.value.trim().toLowerCase(); let shown = 0;
  for (const li of items) {
    const hit = !q || li.dataset.name.includes(q) || li.dataset.k === q;
    li.style.display = hit ? '' : 'none'; shown += hit;
  }
  count.textContent = shown + ' of ' + items.length + ' classes';
});
</script>"""
    body = (f"<h1>Prototype atlas</h1><p class='note'>{model.num_classes} classes; p = {ps} (pages at p = {model.p} "
            f"below, each links to the others); backbone {html.escape(str(model.backbone.spec_dict().get('arch')))}</p>"
            "<p><input id='search' type='search' placeholder='search a class by name or id' autofocus> "
            f"<span id='count' class='note'>{model.num_classes} of {model.num_classes} classes</span></p>"
            f"<ul class='classes'>{items}</ul>{script}")
    return _page("Prototype atlas", body)


def _heatmap_strips(model: PrototypeModel, images: torch.Tensor, shown: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
    """For each prototype of class k at the model's p: the held-out images with its heatmap in its
    colour (inline JPEGs), and its mean contribution to the logit over them."""
    exp = model.explain(images, target=[k] * len(images))
    heat, contrib = exp.heatmaps.cpu().numpy(), exp.contributions.cpu().numpy()
    strips = []
    for i in range(model.p):
        vmax = float(heat[:, i].max()) or 1.0
        strips.append([_jpeg_uri(_jpeg(presence_overlay(shown[j], heat[j, i], prototype_colour(i), vmax=vmax)))
                       for j in range(len(images))])
    return strips, contrib.mean(0)


def _class_page(model: PrototypeModel, k: int, gallery: pa.Table | None, images: torch.Tensor | None,
                shown: np.ndarray | None, agreement: Sequence[float | None] | None = None) -> str:
    name = html.escape(model.class_names[k])
    links = " ".join(f"<b>p = {q}</b>" if q == model.p else f"<a href='{class_page_name(k, q)}'>p = {q}</a>"
                     for q in model.available_p)
    coef = model.C[k].cpu().numpy()
    strips, mean_contrib = (_heatmap_strips(model, images, shown, k) if images is not None and len(images)
                            else ([[] for _ in range(model.p)], None))
    rows = gallery.filter(pc.equal(gallery["class_idx"], k)) if gallery is not None else None
    panels = []
    for i in range(model.p):
        colour = colour_hex(i)
        contribution = (f" · mean contribution to the logit {mean_contrib[i]:+.3g} on {len(images)} held-out images"
                        if mean_contrib is not None else "")
        patches = []
        if rows is not None:
            mine = rows.filter(pc.equal(rows["prototype"], i)).sort_by("rank")
            patches = [_jpeg_uri(j) for j in mine["patch_jpeg"].to_pylist() if j]
        gallery_html = ("<div class='row'>" + "".join(f"<img loading='lazy' alt='prototype {i}: training patch {r}' src='{u}'>"
                                                       for r, u in enumerate(patches)) + "</div>") if patches else \
            "<p class='note'>no gallery (the model was published without one)</p>"
        heat_html = ("<div class='note'>where it is in held-out images</div><div class='row'>" + "".join(
            f"<img loading='lazy' alt='prototype {i}: held-out heatmap {j}' src='{u}'>" for j, u in enumerate(strips[i]))
            + "</div>") if strips[i] else ""
        panels.append(f"<div class='panel' data-prototype='{i}' style='border-left-color:{colour}'>"
                      f"<h3 style='color:{colour}'>prototype {i} · coefficient a = {coef[i]:.3g}{contribution}"
                      f"{agreement_words(agreement, i)}</h3>"
                      f"<div class='note'>where it is most present in training (the same map as the heatmaps)</div>"
                      f"{gallery_html}{heat_html}</div>")
    body = (f"<p><a href='../index.html'>all classes</a></p><h1><span class='id'>{k}</span>{name}</h1>"
            f"<p class='ps'>{links}</p>{''.join(panels)}")
    return _page(f"{model.class_names[k]} · p = {model.p}", body)


@torch.no_grad()
def write_atlas(
    model: PrototypeModel,
    uri: str,
    *,
    source: ImageSource | None = None,
    preprocess: Preprocess | None = None,
    images_per_class: int = 3,
    classes: Sequence[int] | None = None,
    storage_options: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> str:
    """Write the atlas of ``model`` at ``uri`` (a folder, local or any fsspec URI); its index's URI.

    ``source``: held-out images for each class page's heatmaps and mean contributions
    (``images_per_class`` of each class; none without a source or with 0). ``classes``: only these
    classes' pages (the index lists every class; default all). ``evaluation``: the model's
    evaluation, whose per-prototype agreement (when measured) each panel states.
    """
    fs, root = to_fs(uri, storage_options)
    pre = preprocess or (Preprocess(**model.preprocess) if model.preprocess else Preprocess())
    gallery = model.gallery_table() if model.has_gallery else None
    chosen = list(range(model.num_classes) if classes is None else classes)
    by_p = {p: model.with_p(p) for p in model.available_p}
    files: dict[str, bytes] = {}
    for n, k in enumerate(chosen, 1):
        images = shown = None
        if source is not None and images_per_class > 0:
            records = source.records_of(k)[: 2 * images_per_class]
            images = load_images(source, pre, records, workers=0)[0][:images_per_class]
            shown = pre.undo(images)
        for p, m in by_p.items():
            table = gallery.filter(pc.equal(gallery["p"], p)) if gallery is not None else None
            agreement = prototype_agreement(evaluation, p, k) if evaluation else None
            files[join(root, "classes", class_page_name(k, p))] = _class_page(m, k, table, images, shown, agreement).encode()
        if n % PAGES_AT_ONCE == 0 or n == len(chosen):  # a block of classes in memory at a time
            write_objects(fs, files)
            files = {}
    # the index last: until every page is written there is no atlas to open, and a rerun rewrites it whole
    write_objects(fs, {join(root, "index.html"): _index(model).encode()})
    return join(str(uri), "index.html")


def atlas_weights(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """Bytes of the atlas at ``uri``: its index, its largest class page, and all of it."""
    fs, root = to_fs(uri, storage_options)
    pages = fs.find(join(root, "classes"), detail=True)
    sizes = [int(info["size"]) for info in pages.values()]
    index = int(fs.info(join(root, "index.html"))["size"])
    return {"index": index, "largest_page": max(sizes, default=0), "pages": len(sizes), "total": index + sum(sizes)}
