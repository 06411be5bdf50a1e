"""Held-out evaluation of a prototype model against its black box.

One backbone pass per image serves every comparison: the features F give the black box's logits
(mean_hw(F) Vᵀ + bias) and the prototype model's logits for every fitted p and mode (Table 3).
Everything runs where the model is, in its dtype (:mod:`protonmf.devices`): move the model first
(``PrototypeModel.load(uri, map_location="cuda")``) to evaluate on a GPU.

A large held-out set is evaluated in shards, anywhere: :func:`held_out_shards` cuts the records,
:func:`accumulate_held_out` measures one shard into :class:`HeldOutStats`, :func:`merge_held_out`
joins the shards' statistics and :func:`summarize_held_out` turns them into the JSON.
:func:`evaluate_model` is the three over every record in one process; the numbers are the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from protonmf.data import ImageSource, iter_batches
from protonmf.data.records import Record
from protonmf.devices import to_model
from protonmf.evaluation.agreement import agreement, patch_parts
from protonmf.evaluation.interpretability import (
    box_half_size,
    consistency,
    keypoints_of,
    noise_seeds,
    part_vectors,
    peak_locations,
    perturb,
    stability,
)
from protonmf.evaluation.localization import localization_rows, part_localization_of_rows
from protonmf.prototypes.model import MAP_KINDS, MODES, PrototypeModel

__all__ = ["HeldOutStats", "accumulate_held_out", "evaluate_model", "gallery_parts", "held_out_shards", "merge_held_out",
           "summarize_held_out"]


@dataclass
class HeldOutStats:
    """What :func:`summarize_held_out` needs of some held-out images: counts, maxima, and per-image rows.

    Everything merges exactly (:func:`merge_held_out`): counts add, maxima take the max, and the
    per-image rows of the part metrics are concatenated in record order, so the per-class means
    are computed once, over every image, as one pass would.

    Attributes
    ----------
    model_p, mode, available_p : the model's own p and mode, and its fitted p.
    n_images, n_skipped : images used, files skipped (unreadable).
    correct_black_box : images the black box gets right. correct : {(p, mode): images right} (Table 3).
    fixed : {p: wrong predictions set right by one intervention} (Table 4).
    max_abs_logit_diff, max_abs_logit : augmented model vs black box, over every p.
    n_parts : parts of the part masks (0: the source has none, no localization).
    mask_labels : (M,) int64 true classes of the images measured against masks.
    peaks, ious : {p: (M, p) int64 and (M, p, n_parts) float32} (:func:`~protonmf.evaluation.localization.localization_rows`).
    keypoint_labels : (N_k,) int64 true classes of the images with keypoints. visible : (N_k, P) bool.
    part_vectors : {(p, map kind, "clean" | "noisy"): (N_k, p, P) bool} (Huang et al.).
    """

    model_p: int
    mode: str
    available_p: list[int]
    n_images: int = 0
    n_skipped: int = 0
    correct_black_box: int = 0
    correct: dict[tuple[int, str], int] = field(default_factory=dict)
    fixed: dict[int, int] = field(default_factory=dict)
    max_abs_logit_diff: float = 0.0
    max_abs_logit: float = 0.0
    n_parts: int = 0
    mask_labels: Tensor | None = None
    peaks: dict[int, Tensor] = field(default_factory=dict)
    ious: dict[int, Tensor] = field(default_factory=dict)
    keypoint_labels: Tensor | None = None
    visible: Tensor | None = None
    part_vectors: dict[tuple[int, str, str], Tensor] = field(default_factory=dict)


def held_out_shards(n_records: int, shard_images: int, batch_size: int) -> list[tuple[int, int]]:
    """Cut ``n_records`` records into contiguous shards ``[start, stop)`` of ``shard_images`` records,
    rounded up to a multiple of ``batch_size``, so that each shard's batches are those of one pass
    over every record (:func:`accumulate_held_out` batches by records) and merged shards give its
    numbers to the bit.

    >>> held_out_shards(20, 8, 8)
    [(0, 8), (8, 16), (16, 20)]
    >>> held_out_shards(20, 5, 4)
    [(0, 8), (8, 16), (16, 20)]
    """
    if shard_images < 1 or batch_size < 1:
        raise ValueError(f"shard_images and batch_size must be >= 1, got {shard_images} and {batch_size}")
    size = math.ceil(shard_images / batch_size) * batch_size
    return [(start, min(start + size, n_records)) for start in range(0, n_records, size)]


@torch.no_grad()
def accumulate_held_out(
    model: PrototypeModel,
    source: ImageSource,
    preprocess: Callable,
    *,
    records: Sequence[Record] | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    noise_seed: int = 0,
) -> HeldOutStats:
    """The :class:`HeldOutStats` of ``records`` (default: every record of ``source``).

    One backbone pass per image serves every comparison. Batches are cut every ``batch_size``
    records (``iter_batches(by_records=True)``), and each image's noisy copy is seeded by
    ``noise_seed`` and its id, so a shard starting at a multiple of ``batch_size`` computes what
    one pass over everything computes for its images, bit for bit.
    """
    model = model.eval()
    variants = {(p, mode): model.with_p(p).with_mode(mode) for p in model.available_p for mode in MODES}
    stats = HeldOutStats(model_p=model.p, mode=model.mode, available_p=list(model.available_p),
                         correct={key: 0 for key in variants}, fixed={p: 0 for p in model.available_p})
    masks = getattr(source, "masks", None)  # ground-truth parts (the synthetic set)
    with_keypoints = getattr(source, "keypoint_names", None) is not None and hasattr(preprocess, "map_points")
    todo = list(source.records if records is None else records)
    by_id = {r.image_id: r for r in todo} if masks is not None or with_keypoints else {}
    rows: dict[str, list[Tensor]] = {}  # per-image rows of the part metrics, batch after batch
    parts: dict[tuple[int, str, str], list[Tensor]] = {}  # (p, map kind, clean|noisy) -> (B, p, P) part vectors
    for batch in iter_batches(source, preprocess, batch_size, workers=workers, records=todo, by_records=True):
        stats.n_skipped += len(batch.skipped)
        if len(batch) == 0:
            continue
        images = to_model(batch.images, model.backbone.V)  # once per batch, not once per variant
        F = model.features(images)
        labels = batch.labels.to(F.device)
        _count_logits_of_batch(stats, variants, model, F, labels)
        if masks is not None and masks.shape[1:] == batch.images.shape[2:]:
            stats.n_parts = len(source.part_names) - 1
            batch_masks = torch.from_numpy(masks[[by_id[i].index for i in batch.image_ids]])
            rows.setdefault("mask_labels", []).append(batch.labels)
            _localization_rows_of_batch(variants, model, images, labels, batch_masks, stats.n_parts, rows)
        if with_keypoints:
            _part_vectors_of_batch(variants, model, images, F, labels, [by_id[i] for i in batch.image_ids],
                                   preprocess, noise_seeds(noise_seed, batch.image_ids), parts, rows)
            rows.setdefault("keypoint_labels", []).append(batch.labels)
        stats.n_images += len(batch)
    if "mask_labels" in rows:
        stats.mask_labels = torch.cat(rows["mask_labels"])
        stats.peaks = {p: torch.cat(rows[f"peak{p}"]) for p in model.available_p}
        stats.ious = {p: torch.cat(rows[f"iou{p}"]) for p in model.available_p}
    if "keypoint_labels" in rows:
        stats.keypoint_labels, stats.visible = torch.cat(rows["keypoint_labels"]), torch.cat(rows["visible"])
        stats.part_vectors = {key: torch.cat(o) for key, o in parts.items()}
    return stats


def merge_held_out(parts: Sequence[HeldOutStats]) -> HeldOutStats:
    """The :class:`HeldOutStats` of the union of ``parts``' images, given in record order (shards of
    one source, each from :func:`accumulate_held_out` with the same model)."""
    if not parts:
        raise ValueError("merge_held_out: no statistics to merge")
    first = parts[0]
    for other in parts[1:]:
        if (other.model_p, other.mode, other.available_p) != (first.model_p, first.mode, first.available_p):
            raise ValueError("merge_held_out: statistics of different models "
                             f"(p {first.model_p}/{other.model_p}, mode {first.mode}/{other.mode}, "
                             f"fitted p {first.available_p}/{other.available_p})")

    def cat(tensors: list[Tensor | None]) -> Tensor | None:
        tensors = [t for t in tensors if t is not None]
        return torch.cat(tensors) if tensors else None

    def cat_each(dicts: list[dict]) -> dict:
        return {key: torch.cat([d[key] for d in dicts if key in d]) for key in dict.fromkeys(k for d in dicts for k in d)}

    return HeldOutStats(
        model_p=first.model_p, mode=first.mode, available_p=list(first.available_p),
        n_images=sum(s.n_images for s in parts),
        n_skipped=sum(s.n_skipped for s in parts),
        correct_black_box=sum(s.correct_black_box for s in parts),
        correct={key: sum(s.correct[key] for s in parts) for key in first.correct},
        fixed={p: sum(s.fixed[p] for s in parts) for p in first.fixed},
        max_abs_logit_diff=max(s.max_abs_logit_diff for s in parts),
        max_abs_logit=max(s.max_abs_logit for s in parts),
        n_parts=max(s.n_parts for s in parts),
        mask_labels=cat([s.mask_labels for s in parts]),
        peaks=cat_each([s.peaks for s in parts]),
        ious=cat_each([s.ious for s in parts]),
        keypoint_labels=cat([s.keypoint_labels for s in parts]),
        visible=cat([s.visible for s in parts]),
        part_vectors=cat_each([s.part_vectors for s in parts]),
    )


def gallery_parts(model: PrototypeModel, train: ImageSource | None) -> dict[int, Tensor] | None:
    """The part under each gallery patch of ``model`` (:func:`~protonmf.evaluation.agreement.patch_parts`),
    from the part masks of the training source ``train``; None if the model has no gallery or the
    source no masks."""
    if train is None or not model.has_gallery or getattr(train, "masks", None) is None:
        return None
    by_id = {r.image_id: r for r in train.records}
    return patch_parts(model.gallery_table(), lambda iid: train.mask(by_id[iid]) if iid in by_id else None, model.num_classes)


def summarize_held_out(stats: HeldOutStats, what: str = "the held-out images", *,
                       parts_of_gallery: dict[int, Tensor] | None = None) -> dict[str, Any]:
    """The evaluation's JSON (see :func:`evaluate_model`) from the statistics of every image;
    ``parts_of_gallery`` (:func:`gallery_parts`) adds the agreement of galleries and heatmaps."""
    n = stats.n_images
    if n == 0:
        raise ValueError(f"evaluation: no usable images in {what}")
    table3: dict[int, dict[str, float]] = {}
    for (p, mode), hits in stats.correct.items():
        table3.setdefault(p, {})[mode] = hits / n
    localization, agreed = {}, {}
    if stats.mask_labels is not None:
        for p in stats.available_p:
            result = part_localization_of_rows(stats.peaks[p], stats.ious[p], stats.mask_labels, stats.n_parts)
            localization[p] = {k: v for k, v in result.items() if k != "per_class"}
            if parts_of_gallery is not None and p in parts_of_gallery:
                majority = {c: m["majority_part"] for c, m in result["per_class"].items()}
                result = agreement(majority, parts_of_gallery[p])
                result["per_class"] = {c: [None if math.isnan(v) else 100.0 * v for v in shares]
                                       for c, shares in result["per_class"].items()}  # %, None: no gallery
                agreed[p] = result
    intervention = {
        p: {"top1_before": table3[p]["augmented"], "top1_after": table3[p]["augmented"] + stats.fixed[p] / n,
            "fixed": stats.fixed[p]}
        for p in stats.available_p
    }
    interpretability = {}
    if stats.keypoint_labels is not None:
        labels, visible, o = stats.keypoint_labels, stats.visible, stats.part_vectors
        interpretability = {"consistency": {}, "stability": {}}
        for p in stats.available_p:
            for kind in MAP_KINDS:
                clean, noisy = o[(p, kind, "clean")], o[(p, kind, "noisy")]
                interpretability["consistency"].setdefault(p, {})[kind] = consistency(clean, visible, labels)["score"]
                interpretability["stability"].setdefault(p, {})[kind] = stability(clean, noisy, labels)["score"]
    return {
        "n_images": n,
        "n_skipped": stats.n_skipped,
        "top1_black_box": stats.correct_black_box / n,
        "top1_prototype": table3[stats.model_p][stats.mode],
        "max_abs_logit_diff": stats.max_abs_logit_diff,
        "max_abs_logit": stats.max_abs_logit,
        "table3": table3,
        "localization": localization,
        **({"agreement": agreed} if agreed else {}),
        "intervention": intervention,
        **interpretability,
    }


def evaluate_model(
    model: PrototypeModel,
    source: ImageSource,
    preprocess: Callable,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    noise_seed: int = 0,
    train: ImageSource | None = None,
) -> dict[str, Any]:
    """Top-1 of the black box and of the prototype model (each p, each mode) on ``source``.

    ``summarize_held_out(accumulate_held_out(...))`` over every record: the same numbers as
    evaluating shards of the records (:func:`held_out_shards`) apart and merging them
    (:func:`merge_held_out`), which is how a run spreads the evaluation over a cluster.

    Returns
    -------
    dict with ``n_images``, ``n_skipped``, ``top1_black_box``, ``top1_prototype`` (the model's own
    p and mode), ``max_abs_logit_diff`` and ``max_abs_logit`` (augmented model vs black box, over
    all p), ``table3``: {p: {mode: top1}}, and, for sources with part masks (the synthetic set),
    ``localization``: {p: purity, on_object, coverage, iou} of the prototypes' heatmaps on the
    images' true class (see :mod:`protonmf.evaluation.localization`); ``intervention`` (Table 4): {p:
    top1_before, top1_after, fixed} when each wrong prediction loses its predicted class's most
    important prototype. For sources with keypoints (CUB with ``parts/``, the synthetic set) and a
    :class:`~protonmf.data.Preprocess`, ``consistency`` and ``stability``: {p: {kind: %}} for each
    reading of :data:`~protonmf.prototypes.model.MAP_KINDS` (Huang et al. 2023,
    :mod:`protonmf.evaluation.interpretability`): ``codes`` (the heatmaps' and the gallery's
    definition, :mod:`protonmf.prototypes.where`), ``presence`` (eq. 9) and ``activation`` (F p̃_iᵀ),
    each image's noise drawn from ``noise_seed`` and its id. With ``train``, the training source
    whose part masks the gallery's patches lie on, and a model with a gallery: ``agreement``:
    {p: {score (%), n_prototypes, per_class: {class: % per prototype, None without a gallery}}}
    (:mod:`protonmf.evaluation.agreement`).
    """
    stats = accumulate_held_out(model, source, preprocess, batch_size=batch_size, workers=workers, noise_seed=noise_seed)
    return summarize_held_out(stats, repr(source), parts_of_gallery=gallery_parts(model, train))


def _count_logits_of_batch(stats: HeldOutStats, variants: dict[tuple[int, str], PrototypeModel], model: PrototypeModel,
                           F: Tensor, labels: Tensor) -> None:
    """Add one batch's features F (B, h, w, D) to ``stats``' counts: the black box's and each
    variant's right answers (Table 3), the augmented models' largest logit difference to the black
    box, and the wrong predictions one intervention sets right (Table 4)."""
    black_box = model.backbone.head_logits(F)
    stats.correct_black_box += int((black_box.argmax(1) == labels).sum())
    stats.max_abs_logit = max(stats.max_abs_logit, float(black_box.abs().max()))
    for key, variant in variants.items():
        logits = variant.logits_from_features(F)
        stats.correct[key] += int((logits.argmax(1) == labels).sum())
        if key[1] == "augmented":
            stats.max_abs_logit_diff = max(stats.max_abs_logit_diff, float((logits - black_box).abs().max()))
            stats.fixed[key[0]] += _fixed_by_intervention(variant, F, logits, labels)


def _localization_rows_of_batch(variants: dict[tuple[int, str], PrototypeModel], model: PrototypeModel, images: Tensor,
                                labels: Tensor, masks: Tensor, n_parts: int, rows: dict[str, list[Tensor]]) -> None:
    """Localization rows (peaks, IoUs) of one batch against its part masks (B, H, W), for every p:
    where each prototype of the true class is (the heatmaps of ``explain``, :mod:`protonmf.prototypes.where`)."""
    for p in model.available_p:
        heat = variants[(p, model.mode)].explain(images, target=labels).heatmaps.cpu()
        peak, iou = localization_rows(heat, masks, n_parts)
        rows.setdefault(f"peak{p}", []).append(peak)
        rows.setdefault(f"iou{p}", []).append(iou)


def _part_vectors_of_batch(variants, model, images, F, labels, records, preprocess, seeds, parts, rows) -> None:
    """Part vectors (Huang et al.) of one batch for every p, map kind, clean and noisy images."""
    keypoints, visible = keypoints_of(records, preprocess)
    rows.setdefault("visible", []).append(visible)
    F_noisy = model.features(perturb(images, seeds))
    size = tuple(images.shape[-2:])
    half = box_half_size(images.shape[-1])
    for p in model.available_p:
        variant = variants[(p, model.mode)]
        for tag, feats in (("clean", F), ("noisy", F_noisy)):
            for kind, maps in variant.prototype_maps(feats, labels).items():
                o = part_vectors(peak_locations(maps.cpu(), size), keypoints, visible, half)
                parts.setdefault((p, kind, tag), []).append(o)


def _fixed_by_intervention(model: PrototypeModel, F: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> int:
    """ProtoNMF Table 4: for each wrong prediction, remove the predicted class's most important
    prototype (largest coefficient) and count the images that become right."""
    pred = logits.argmax(1)
    wrong = pred != labels
    if not bool(wrong.any()):
        return 0
    vectors, coef = model._class_vectors()
    top = coef.argmax(1)  # (K,) most important prototype of each class
    c = pred[wrong]
    pooled = F[wrong].flatten(1, 2).mean(1).double()
    contribution = coef[c, top[c]] * (pooled * vectors[c, top[c]]).sum(1)
    edited = logits[wrong].double().clone()
    edited[torch.arange(len(c)), c] -= contribution
    return int((edited.argmax(1) == labels[wrong]).sum())
