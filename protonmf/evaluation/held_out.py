"""Held-out evaluation of a prototype model against its black box.

One backbone pass per image serves every comparison: the features F give the black box's logits
(mean_hw(F) Vᵀ + bias) and the prototype model's logits for every fitted p and mode (Table 3).
Everything runs where the model is, in its dtype (:mod:`protonmf.devices`): move the model first
(``PrototypeModel.load(uri, map_location="cuda")``) to evaluate on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from protonmf.data import ImageSource, iter_batches
from protonmf.devices import to_model
from protonmf.evaluation.interpretability import (
    box_half_size,
    consistency,
    keypoints_of,
    part_vectors,
    peak_locations,
    perturb,
    stability,
)
from protonmf.evaluation.localization import part_localization
from protonmf.prototypes.model import MODES, PrototypeModel

__all__ = ["evaluate_model"]


@torch.no_grad()
def evaluate_model(
    model: PrototypeModel,
    source: ImageSource,
    preprocess: Callable,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    noise_seed: int = 0,
) -> dict[str, Any]:
    """Top-1 of the black box and of the prototype model (each p, each mode) on ``source``.

    Returns
    -------
    dict with ``n_images``, ``n_skipped``, ``top1_black_box``, ``top1_prototype`` (the model's own
    p and mode), ``max_abs_logit_diff`` and ``max_abs_logit`` (augmented model vs black box, over
    all p), ``table3``: {p: {mode: top1}}, and, for sources with part masks (the synthetic set),
    ``localization``: {p: purity, on_object, coverage, iou} of the prototypes' heatmaps on the
    images' true class (see :mod:`protonmf.evaluation.localization`); ``intervention`` (Table 4): {p:
    top1_before, top1_after, fixed} when each wrong prediction loses its predicted class's most
    important prototype. For sources with keypoints (CUB with ``parts/``, the synthetic set) and a
    :class:`~protonmf.data.Preprocess`, ``consistency`` and ``stability``: {p: {"presence": %,
    "activation": %}} (Huang et al. 2023, :mod:`protonmf.evaluation.interpretability`), from the
    presence maps (eq. 9) and from F p̃_iᵀ, the noise drawn from ``noise_seed``.
    """
    model = model.eval()
    variants = {(p, mode): model.with_p(p).with_mode(mode) for p in model.available_p for mode in MODES}
    correct = {key: 0 for key in variants}
    fixed = {p: 0 for p in model.available_p}  # Table 4: wrong predictions set right by one intervention
    correct_bb = n = n_skipped = 0
    max_diff = max_logit = 0.0
    masks = getattr(source, "masks", None)  # ground-truth parts (the synthetic set)
    with_keypoints = getattr(source, "keypoint_names", None) is not None and hasattr(preprocess, "map_points")
    by_id = {r.image_id: r for r in source.records} if masks is not None or with_keypoints else {}
    noise = torch.Generator().manual_seed(noise_seed)
    parts: dict[tuple[int, str, str], list[torch.Tensor]] = {}  # (p, map kind, clean|noisy) -> (B, p, P) part vectors
    part_labels: list[torch.Tensor] = []
    part_visible: list[torch.Tensor] = []
    heat: dict[int, list[torch.Tensor]] = {p: [] for p in model.available_p}
    mask_rows: list[torch.Tensor] = []
    label_rows: list[torch.Tensor] = []
    for batch in iter_batches(source, preprocess, batch_size, workers=workers):
        n_skipped += len(batch.skipped)
        if len(batch) == 0:
            continue
        images = to_model(batch.images, model.backbone.V)  # once per batch, not once per variant
        F = model.features(images)
        labels = batch.labels.to(F.device)
        black_box = model.backbone.head_logits(F)
        correct_bb += int((black_box.argmax(1) == labels).sum())
        max_logit = max(max_logit, float(black_box.abs().max()))
        for key, variant in variants.items():
            logits = variant.logits_from_features(F)
            correct[key] += int((logits.argmax(1) == labels).sum())
            if key[1] == "augmented":
                max_diff = max(max_diff, float((logits - black_box).abs().max()))
                fixed[key[0]] += _fixed_by_intervention(variant, F, logits, labels)
        if masks is not None and masks.shape[1:] == batch.images.shape[2:]:
            mask_rows.append(torch.from_numpy(masks[[by_id[i].index for i in batch.image_ids]]))
            label_rows.append(batch.labels)
            for p in model.available_p:  # where each prototype of the true class is (eq. 9)
                heat[p].append(variants[(p, model.mode)].explain(images, target=labels).heatmaps.cpu())
        if with_keypoints:
            _part_vectors_of_batch(variants, model, images, F, labels, [by_id[i] for i in batch.image_ids],
                                   preprocess, noise, parts, part_visible)
            part_labels.append(batch.labels)
        n += len(batch)
    if n == 0:
        raise ValueError(f"evaluation: no usable images in {source!r}")
    table3: dict[int, dict[str, float]] = {}
    for (p, mode), hits in correct.items():
        table3.setdefault(p, {})[mode] = hits / n
    localization = {}
    if mask_rows:
        all_masks, all_labels = torch.cat(mask_rows), torch.cat(label_rows)
        n_parts = len(source.part_names) - 1
        for p, maps in heat.items():
            result = part_localization(torch.cat(maps), all_masks, all_labels, n_parts)
            localization[p] = {k: v for k, v in result.items() if k != "per_class"}
    intervention = {
        p: {"top1_before": table3[p]["augmented"], "top1_after": table3[p]["augmented"] + fixed[p] / n, "fixed": fixed[p]}
        for p in model.available_p
    }
    interpretability = {}
    if part_labels:
        all_labels, visible = torch.cat(part_labels), torch.cat(part_visible)
        interpretability = {"consistency": {}, "stability": {}}
        for p in model.available_p:
            for kind in ("presence", "activation"):
                o, o_noisy = torch.cat(parts[(p, kind, "clean")]), torch.cat(parts[(p, kind, "noisy")])
                interpretability["consistency"].setdefault(p, {})[kind] = consistency(o, visible, all_labels)["score"]
                interpretability["stability"].setdefault(p, {})[kind] = stability(o, o_noisy, all_labels)["score"]
    return {
        "n_images": n,
        "n_skipped": n_skipped,
        "top1_black_box": correct_bb / n,
        "top1_prototype": table3[model.p][model.mode],
        "max_abs_logit_diff": max_diff,
        "max_abs_logit": max_logit,
        "table3": table3,
        "localization": localization,
        "intervention": intervention,
        **interpretability,
    }


def _part_vectors_of_batch(variants, model, images, F, labels, records, preprocess, noise, parts, visible_rows) -> None:
    """Part vectors (Huang et al.) of one batch for every p, map kind, clean and noisy images."""
    keypoints, visible = keypoints_of(records, preprocess)
    visible_rows.append(visible)
    F_noisy = model.features(perturb(images, noise))
    size = tuple(images.shape[-2:])
    half = box_half_size(images.shape[-1])
    for p in model.available_p:
        variant = variants[(p, model.mode)]
        for tag, feats in (("clean", F), ("noisy", F_noisy)):
            presence, activation = variant.prototype_maps(feats, labels)
            for kind, maps in (("presence", presence), ("activation", activation)):
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
