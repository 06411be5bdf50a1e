"""Explain single images with a prototype model: numbers as JSON, pictures as PNG (Figure 3 / 9).

For each image: the predicted class, each prototype's contribution to that logit, the residual's
share, the bias, and a picture with, per prototype, its heatmap in its own colour, its
contribution and coefficient, and its gallery (the training patches where it is most present, when
the model has one: :mod:`protonmf.prototypes.gallery`). With interventions
(paper A.4), the same again for the edited model, so the two can be compared.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow.compute as pc
import torch

from protonmf.data import Preprocess, load_image
from protonmf.prototypes.gallery import class_patches
from protonmf.viz.prototype_figures import explanation_figure
from protonmf.prototypes.model import PrototypeModel
from protonmf.viz.png import figure_png
from protonmf.storage import join, to_fs, write_bytes_atomic

__all__ = ["explain_images", "parse_interventions"]


def parse_interventions(text: str) -> dict[str, list[int]]:
    """``"CLASS:PROTO,CLASS:PROTO"`` (class as index or name) → {class: [prototypes]}."""
    out: dict[str, list[int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if ":" not in item:
            raise ValueError(f"--intervene expects CLASS:PROTO items, got {item!r}")
        cls, proto = item.rsplit(":", 1)
        if not proto.isdigit():
            raise ValueError(f"--intervene: prototype index in {item!r} is not a number")
        out.setdefault(cls, []).append(int(proto))
    return out


def _class_key(model: PrototypeModel, key: str) -> int | str:
    return int(key) if key.isdigit() and key not in model.class_names else key


def _describe(model: PrototypeModel, images: torch.Tensor) -> tuple[list[dict[str, Any]], Any]:
    exp = model.explain(images)
    rows = []
    for b in range(images.shape[0]):
        c = int(exp.target[b])
        probs = torch.softmax(exp.logits[b].double(), 0)
        rows.append({
            "predicted_class": c,
            "predicted_name": model.class_names[c],
            "probability": float(probs[c]),
            "logit": float(exp.logits[b, c]),
            "contributions": [float(v) for v in exp.contributions[b]],
            "coefficients": model.C[c].tolist(),
            "residual": float(exp.residual[b]),
            "residual_spread_over_prototypes": bool(model.spread[c]),
            "bias": float(exp.bias[b]),
        })
    return rows, exp


def _gallery_entries(gallery, c: int, p: int) -> list[list[dict[str, Any]]]:
    """Class c's gallery as numbers, per prototype: image id, URI, box (x0, y0, x1, y1) in the image's pixels, E."""
    rows = gallery.filter(pc.equal(gallery["class_idx"], c)).select(
        ["prototype", "image_id", "uri", "x0", "y0", "x1", "y1", "score"]).to_pylist()
    out: list[list[dict[str, Any]]] = [[] for _ in range(p)]
    for r in rows:
        out[r.pop("prototype")].append({"image_id": r["image_id"], "uri": r["uri"], "score": r["score"],
                                        "box": [r["x0"], r["y0"], r["x1"], r["y1"]]})
    return out


def explain_images(
    model: PrototypeModel,
    uris: Sequence[str],
    out: str,
    *,
    interventions: Mapping[str, Sequence[int]] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Write ``<out>/<i>_<name>.png`` and ``<out>/explanations.json`` for the images at ``uris``.

    Images that cannot be read are reported with their reason instead of stopping the rest.
    """
    pre = Preprocess(**model.preprocess) if model.preprocess else Preprocess()
    fs, root = to_fs(out, storage_options)
    edited = model.intervene({_class_key(model, k): list(v) for k, v in interventions.items()}) if interventions else None
    gallery = model.gallery() if model.has_gallery else None  # the same p for the intervened model
    results = []
    for i, uri in enumerate(uris):
        img, reason = load_image(uri)
        if img is None:
            results.append({"image": uri, "skipped": reason})
            continue
        x = pre(img).unsqueeze(0)
        display = pre.undo(x)[0]
        entry: dict[str, Any] = {"image": uri}
        for name, m in (("model", model), ("intervened", edited)):
            if m is None:
                continue
            rows, exp = _describe(m, x)
            row = rows[0]
            stem = f"{i:03d}_{name}"
            c = row["predicted_class"]
            fig = explanation_figure(
                display, exp.heatmaps[0].numpy(), exp.residual_heatmap[0].numpy(), row["contributions"],
                title=f"{'intervened: ' if name == 'intervened' else ''}{row['predicted_name']} "
                      f"(logit {row['logit']:.3f}, p {row['probability']:.2f})",
                residual=None if row["residual_spread_over_prototypes"] else row["residual"],
                coefficients=row["coefficients"],
                patches=class_patches(gallery, c, m.p) if gallery is not None else None,
            )
            write_bytes_atomic(fs, join(root, f"{stem}.png"), figure_png(fig, dpi=100))
            entry[name] = {**row, "picture": join(out, f"{stem}.png")}
            if gallery is not None:
                entry[name]["gallery"] = _gallery_entries(gallery, c, m.p)
        results.append(entry)
    write_bytes_atomic(fs, join(root, "explanations.json"), json.dumps(results, indent=2).encode())
    return results
