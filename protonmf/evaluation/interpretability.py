"""Consistency and stability of prototypes against part keypoints, as Huang et al. compute them.

Huang, Lu, Zhou et al., "Evaluation and Improvement of Interpretability for Part-Prototype Based
Classifiers" (ICCV 2023; public code ``hqhQAQ/EvalProtoPNet``, ``util/eval_interpretability.py``).

Notation: N images, each evaluated with the p prototypes of its true class; P keypoints (parts)
per image, with a visibility flag; S the side of the network's input (224 in the paper).

- peak: a prototype's activation map upsampled (bicubic) to S × S, and the pixel of its maximum.
- part vector o ∈ {0,1}^P of (image, prototype): 1 for each *visible* keypoint inside the box of
  side 72 px (±36 px) around the peak at S = 224; for other S the half-side scales, 36 · S / 224
  (a 64 px demo image: ±10.3 px). The box is clipped to the image, which changes nothing for
  keypoints inside the image.
- consistency of a prototype: for each part, the mean of o over its class's images in which the
  part is visible; consistent if some part reaches ``threshold`` (0.8). Score: share of
  consistent prototypes, in %.
- stability of a prototype: the share of its class's images whose part vector is unchanged on a
  noisy copy of the image (N(0, 0.2²) clipped to ±0.25, added in normalised input space, seeded
  per image by the evaluation's seed and the image's id, so a copy does not depend on which batch
  or which process evaluated it). Score: the mean over prototypes, in %.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor

__all__ = [
    "BOX_HALF_SIZE_224",
    "NOISE_CLIP",
    "NOISE_STD",
    "box_half_size",
    "consistency",
    "noise_seeds",
    "part_vectors",
    "peak_locations",
    "perturb",
    "stability",
]

BOX_HALF_SIZE_224 = 36  # px at a 224 px input (a 72 × 72 box)
NOISE_STD = 0.2
NOISE_CLIP = 0.25
CONSISTENCY_THRESHOLD = 0.8


def box_half_size(image_size: int) -> float:
    """Half the box side for an input of ``image_size`` px: 36 px at 224, in proportion otherwise."""
    return BOX_HALF_SIZE_224 * image_size / 224


def peak_locations(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Where each map peaks once upsampled (bicubic) to ``size`` (H, W).

    Parameters
    ----------
    maps : (N, p, h, w) activation maps at the feature grid.

    Returns
    -------
    peaks : (N, p, 2) float64, (x, y) of the maximum in pixels of the H × W image (first maximum
        in row-major order on ties).
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must have shape (N, p, h, w), got {tuple(maps.shape)}")
    H, W = int(size[0]), int(size[1])
    up = nnf.interpolate(maps.float(), size=(H, W), mode="bicubic", align_corners=False)
    idx = up.flatten(2).argmax(2)  # (N, p)
    return torch.stack([idx % W, idx // W], -1).double()


def part_vectors(peaks: Tensor, keypoints: Tensor, visible: Tensor, half_size: float) -> Tensor:
    """o[n, i, j] = keypoint j of image n is visible and inside the box of prototype i's peak.

    Parameters
    ----------
    peaks : (N, p, 2) (x, y). keypoints : (N, P, 2) (x, y), in the same pixels. visible : (N, P) bool.
    half_size : the box's half side in pixels (:func:`box_half_size`); the box is closed.

    Returns
    -------
    o : (N, p, P) bool.
    """
    if peaks.ndim != 3 or keypoints.ndim != 3 or visible.shape != keypoints.shape[:2] or peaks.shape[0] != keypoints.shape[0]:
        raise ValueError(
            f"peaks (N, p, 2), keypoints (N, P, 2) and visible (N, P) do not match: "
            f"{tuple(peaks.shape)}, {tuple(keypoints.shape)}, {tuple(visible.shape)}"
        )
    d = (keypoints.double().unsqueeze(1) - peaks.double().unsqueeze(2)).abs()  # (N, p, P, 2)
    return visible.bool().unsqueeze(1) & (d <= half_size).all(-1)


def _per_class(labels: Tensor) -> list[tuple[int, Tensor]]:
    return [(int(c), labels == c) for c in torch.unique(labels).tolist()]


def consistency(o: Tensor, visible: Tensor, labels: Tensor, *, threshold: float = CONSISTENCY_THRESHOLD) -> dict[str, Any]:
    """Share of consistent prototypes (%).

    Parameters
    ----------
    o : (N, p, P) bool, part vectors of each image with its true class's prototypes.
    visible : (N, P) bool. labels : (N,) the images' classes.

    Returns
    -------
    dict with ``score`` (%, over the prototypes of every class in ``labels``), ``n_prototypes``, and
    ``per_class``: {class: per-prototype bool list}. A part never visible in a class counts for none
    of its prototypes.
    """
    per_class: dict[int, list[bool]] = {}
    for c, sel in _per_class(labels):
        hits = (o[sel] & visible[sel].unsqueeze(1)).sum(0).double()  # (p, P)
        seen = visible[sel].sum(0).double()  # (P,)
        rate = torch.where(seen > 0, hits / seen.clamp_min(1), torch.tensor(-1.0, dtype=torch.float64))
        per_class[c] = (rate.max(1).values >= threshold).tolist()
    flags = [f for v in per_class.values() for f in v]
    return {"score": 100.0 * sum(flags) / len(flags), "n_prototypes": len(flags), "per_class": per_class}


def stability(o: Tensor, o_noisy: Tensor, labels: Tensor) -> dict[str, Any]:
    """Mean over prototypes of the share of their class's images whose part vector the noise left unchanged (%).

    Parameters
    ----------
    o, o_noisy : (N, p, P) bool, on the images and on their noisy copies. labels : (N,).

    Returns
    -------
    dict with ``score`` (%), ``n_prototypes`` and ``per_class``: {class: per-prototype share}.
    """
    if o.shape != o_noisy.shape:
        raise ValueError(f"part vectors of the images {tuple(o.shape)} and of their noisy copies {tuple(o_noisy.shape)} differ in shape")
    same = (o == o_noisy).all(2)  # (N, p)
    per_class = {c: same[sel].double().mean(0).tolist() for c, sel in _per_class(labels)}
    shares = [s for v in per_class.values() for s in v]
    return {"score": 100.0 * sum(shares) / len(shares), "n_prototypes": len(shares), "per_class": per_class}


def noise_seeds(seed: int, image_ids: Sequence[str]) -> list[int]:
    """The seed of each image's noise: a hash of the evaluation's ``seed`` and the image's id."""
    return [int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "little") >> 1 for i in image_ids]


def perturb(images: Tensor, seeds: Sequence[int]) -> Tensor:
    """images + noise, noise ~ N(0, 0.2²) clipped to ±0.25, in normalised input space.

    Parameters
    ----------
    images : (B, 3, H, W). seeds : B seeds (:func:`noise_seeds`), one per image: image i's noise is
        drawn from a generator seeded with ``seeds[i]`` alone, so it does not depend on the batch.

    The noise is drawn on the CPU (so a seed gives the same noise on any device) and moved to the images.
    """
    if len(seeds) != images.shape[0]:
        raise ValueError(f"{len(seeds)} noise seeds for {images.shape[0]} images")
    draws = [torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(s), dtype=torch.float32) for s in seeds]
    noise = (torch.stack(draws) if draws else torch.zeros(images.shape)) * NOISE_STD
    return images + noise.clamp(-NOISE_CLIP, NOISE_CLIP).to(device=images.device, dtype=images.dtype)


def keypoints_of(records: list, preprocess: Any) -> tuple[Tensor, Tensor]:
    """The keypoints of ``records`` in the pixels of their preprocessed images.

    Parameters
    ----------
    records : :class:`~protonmf.data.records.Record` with ``keypoints`` and ``size``.
    preprocess : a :class:`~protonmf.data.preprocess.Preprocess` (its ``map_points``); a keypoint
        the centre crop cuts off counts as not visible.

    Returns
    -------
    keypoints : (B, P, 2) float64 (x, y). visible : (B, P) bool.
    """
    missing = [r.image_id for r in records if r.keypoints is None or r.size is None]
    if missing:
        raise ValueError(f"records without keypoints or image size: {missing[:5]}")
    rows = torch.tensor([[list(k) for k in r.keypoints] for r in records], dtype=torch.float64)  # (B, P, 3)
    points, inside = [], []
    for r, row in zip(records, rows):
        xy, ok = preprocess.map_points(row[:, :2].numpy(), r.size)
        points.append(torch.from_numpy(xy))
        inside.append(torch.from_numpy(ok))
    return torch.stack(points), torch.stack(inside) & rows[..., 2].bool()
