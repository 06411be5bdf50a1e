"""Do prototypes find parts? Heatmaps measured against ground-truth part masks.

For the images of one class, ``heatmaps`` (N, p, H, W) say where each of the class's p
prototypes is, and ``masks`` (N, H, W) give each pixel's part (0 = background, 1..P = parts).

- peak part: the part under the maximum of a prototype's heatmap, per image.
- purity of a prototype: the share of images whose peak falls on the prototype's most frequent
  peak part (its *majority part*).
- on-object rate: the share of peaks that fall on a part rather than the background.
- coverage of a class: how many distinct parts (background excluded) are the majority part of
  at least one of its prototypes.
- IoU of a prototype: its heatmap thresholded at ``threshold`` × its per-image maximum, against
  each part's mask, averaged over images; we keep the best-matching part's IoU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "class_localization",
    "class_localization_of_rows",
    "localization_rows",
    "part_localization",
    "part_localization_of_rows",
]


def localization_rows(heatmaps: Tensor, masks: Tensor, n_parts: int, *, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """What :func:`class_localization` needs of each image, computed image by image (so images can
    be measured in batches, or in several processes, and their rows concatenated).

    Parameters
    ----------
    heatmaps : (N, p, H, W), non-negative presence maps at the masks' resolution.
    masks : (N, H, W) integer part labels in [0, n_parts].
    n_parts : number of parts (background excluded).

    Returns
    -------
    peak : (N, p) int64, the part under each prototype's heatmap maximum (0: background).
    iou : (N, p, n_parts) float32, IoU of each prototype's thresholded heatmap with each part's mask.
    """
    if heatmaps.ndim != 4 or masks.ndim != 3 or heatmaps.shape[0] != masks.shape[0] or heatmaps.shape[2:] != masks.shape[1:]:
        raise ValueError(f"heatmaps (N, p, H, W) and masks (N, H, W) do not match: {tuple(heatmaps.shape)}, {tuple(masks.shape)}")
    N, p = heatmaps.shape[:2]
    flat = heatmaps.flatten(2).float()  # (N, p, HW)
    labels = masks.flatten(1).long()  # (N, HW)
    peak = torch.gather(labels.unsqueeze(1).expand(N, p, -1), 2, flat.argmax(2, keepdim=True)).squeeze(2)  # (N, p)
    region = flat >= threshold * flat.amax(2, keepdim=True).clamp_min(1e-12)  # (N, p, HW)
    parts = torch.nn.functional.one_hot(labels, n_parts + 1)[..., 1:].permute(0, 2, 1).bool()  # (N, P, HW)
    inter = (region.unsqueeze(2) & parts.unsqueeze(1)).sum(3).float()  # (N, p, P)
    union = (region.unsqueeze(2) | parts.unsqueeze(1)).sum(3).float()
    return peak, inter / union.clamp_min(1)


def class_localization(heatmaps: Tensor, masks: Tensor, n_parts: int, *, threshold: float = 0.5) -> dict[str, Any]:
    """Localization metrics of one class's p prototypes, from its N images' ``heatmaps`` (N, p, H, W)
    and ``masks`` (N, H, W) (see :func:`localization_rows`).

    Returns
    -------
    dict with per-prototype ``majority_part`` (p,), ``purity`` (p,), ``iou`` (p,), ``iou_part`` (p,),
    and per-class ``on_object`` and ``coverage``.
    """
    return class_localization_of_rows(*localization_rows(heatmaps, masks, n_parts, threshold=threshold), n_parts)


def class_localization_of_rows(peak: Tensor, iou: Tensor, n_parts: int) -> dict[str, Any]:
    """:func:`class_localization` from the rows :func:`localization_rows` gives for the class's N images
    (``peak`` (N, p), ``iou`` (N, p, n_parts))."""
    N = peak.shape[0]
    counts = torch.nn.functional.one_hot(peak, n_parts + 1).sum(0)  # (p, parts + 1)
    majority = counts.argmax(1)
    purity = counts.max(1).values.float() / N
    on_object = float((peak > 0).float().mean())
    coverage = len({int(m) for m in majority if m > 0})
    best = iou.mean(0).max(1)  # (p, P) mean over images, then the best-matching part
    return {
        "majority_part": majority.tolist(),
        "purity": purity.tolist(),
        "iou": best.values.tolist(),
        "iou_part": (best.indices + 1).tolist(),
        "on_object": on_object,
        "coverage": coverage,
    }


def part_localization(heatmaps: Tensor, masks: Tensor, labels: Tensor, n_parts: int, **kwargs: Any) -> dict[str, Any]:
    """:func:`class_localization` for every class present in ``labels`` (N,), with means over classes."""
    return part_localization_of_rows(*localization_rows(heatmaps, masks, n_parts, **kwargs), labels, n_parts)


def part_localization_of_rows(peak: Tensor, iou: Tensor, labels: Tensor, n_parts: int) -> dict[str, Any]:
    """:func:`part_localization` from the rows of :func:`localization_rows` (``peak`` (N, p), ``iou``
    (N, p, n_parts)) and the images' classes ``labels`` (N,)."""
    per_class = {}
    for c in sorted(set(labels.tolist())):
        sel = labels == c
        per_class[int(c)] = class_localization_of_rows(peak[sel], iou[sel], n_parts)
    values = list(per_class.values())

    def mean(key: str) -> float:
        items = [v for m in values for v in (m[key] if isinstance(m[key], list) else [m[key]])]
        return float(sum(items) / len(items))

    return {
        "purity": mean("purity"),
        "on_object": mean("on_object"),
        "coverage": mean("coverage"),
        "iou": mean("iou"),
        "per_class": per_class,
    }
