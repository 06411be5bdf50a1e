"""Explain single images with a prototype model, as numbers (Figure 3 / 9's; the pictures are
drawn by :mod:`protonmf.viz.explanations`).

For each image: the predicted class, each prototype's contribution to that logit, its
coefficient, the residual's share and the bias (:func:`describe`); the class's gallery as numbers
(:func:`gallery_entries`); interventions (paper A.4) as the command line gives them
(:func:`parse_interventions`, :func:`class_key`).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from protonmf.prototypes.model import Explanation, PrototypeModel

__all__ = ["class_key", "describe", "gallery_entries", "parse_interventions"]


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


def class_key(model: PrototypeModel, key: str) -> int | str:
    """A class given on the command line: its index if ``key`` is a number that is not a class name, else its name."""
    return int(key) if key.isdigit() and key not in model.class_names else key


def describe(model: PrototypeModel, images: torch.Tensor) -> tuple[list[dict[str, Any]], Explanation]:
    """Per image of ``images`` (B, 3, S, S), preprocessed: its predicted class and how its logit is made."""
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


def gallery_entries(gallery: pa.Table, c: int, p: int) -> list[list[dict[str, Any]]]:
    """Class c's gallery as numbers, per prototype: image id, URI, box (x0, y0, x1, y1) in the image's pixels, E."""
    rows = gallery.filter(pc.equal(gallery["class_idx"], c)).select(
        ["prototype", "image_id", "uri", "x0", "y0", "x1", "y1", "score"]).to_pylist()
    out: list[list[dict[str, Any]]] = [[] for _ in range(p)]
    for r in rows:
        out[r.pop("prototype")].append({"image_id": r["image_id"], "uri": r["uri"], "score": r["score"],
                                        "box": [r["x0"], r["y0"], r["x1"], r["y1"]]})
    return out
