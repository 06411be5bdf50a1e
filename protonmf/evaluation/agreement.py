"""Agreement: does a prototype's gallery show the part its heatmaps show?

Heatmaps and gallery come from one map (:mod:`protonmf.prototypes.where`), drawn on held-out
images and ranked over training images; agreement measures whether the two pictures a user sees
tell the same story.

- majority part m_i of a prototype: the part (0 = background) under its held-out heatmaps' peak
  most often (:func:`~protonmf.evaluation.localization.class_localization`).
- part of a gallery patch: the label of the training image's part mask at the centre of the
  patch's cell (its box in the image's own pixels, :mod:`protonmf.prototypes.gallery`), where a
  heatmap that peaks in that cell has its maximum.
- agreement of a prototype: the share of its gallery patches whose part is m_i. Score: the mean
  over the prototypes that have a gallery, in %.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

__all__ = ["agreement", "patch_parts"]


def _cell_part(mask: np.ndarray, box: Sequence[float]) -> int:
    """The label of ``mask`` (H, W) at the centre of the box (x0, y0, x1, y1), in its pixels: where
    a heatmap upsampled from that cell alone peaks, so a patch is read as a held-out peak is."""
    H, W = mask.shape
    x0, y0, x1, y1 = box
    col = min(W - 1, max(0, int(math.floor((x0 + x1) / 2))))
    row = min(H - 1, max(0, int(math.floor((y0 + y1) / 2))))
    return int(mask[row, col])


def patch_parts(gallery: pa.Table, mask_of: Callable[[str], np.ndarray | None], num_classes: int) -> dict[int, Tensor]:
    """The part each gallery patch lies on, per fitted p.

    Parameters
    ----------
    gallery : the gallery of every p (``PrototypeModel.gallery_table()``).
    mask_of : training image id → its (H, W) part-label mask in the image's own pixels (None: unknown).
    num_classes : K.

    Returns
    -------
    {p: (K, p, k) int64}, the part of each (class, prototype, rank) patch; −1 where there is none
    (no such rank, no box, no mask).
    """
    cols = gallery.select(["p", "class_idx", "prototype", "rank", "image_id", "x0", "y0", "x1", "y1"]).to_pydict()
    if not cols["p"]:
        return {}
    k = max(cols["rank"]) + 1
    out = {p: torch.full((num_classes, p, k), -1, dtype=torch.int64) for p in set(cols["p"])}
    masks: dict[str, np.ndarray | None] = {}
    for p, c, i, rank, iid, *box in zip(*cols.values()):
        if any(v is None for v in box):
            continue
        if iid not in masks:
            masks[iid] = mask_of(iid)
        if masks[iid] is not None:
            out[p][c, i, rank] = _cell_part(masks[iid], box)
    return out


def agreement(majority: Mapping[int, Sequence[int]], parts: Tensor) -> dict[str, Any]:
    """Share of each prototype's gallery patches on its majority part (%).

    Parameters
    ----------
    majority : {class: the majority part of each of its p prototypes} (the held-out classes).
    parts : (K, p, k) the part of each gallery patch (:func:`patch_parts`), −1 for none.

    Returns
    -------
    dict with ``score`` (%, mean over the prototypes of ``majority``'s classes that have a gallery;
    NaN if none has), ``n_prototypes`` (those), ``per_class``: {class: per-prototype share, NaN without a gallery}.
    """
    per_class: dict[int, list[float]] = {}
    for c, parts_of in majority.items():
        shares = []
        for i, m in enumerate(parts_of):
            seen = parts[c, i][parts[c, i] >= 0]
            shares.append(float((seen == int(m)).double().mean()) if seen.numel() else float("nan"))
        per_class[int(c)] = shares
    kept = [s for v in per_class.values() for s in v if not math.isnan(s)]
    return {"score": 100.0 * sum(kept) / len(kept) if kept else float("nan"), "n_prototypes": len(kept),
            "per_class": per_class}
