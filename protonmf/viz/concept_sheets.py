"""The PNG files of a concept set: per class its concepts' crops, importance, tree, fidelity
curves and attribution maps (:func:`class_figures`), and the mean fidelity curves (:func:`mean_fidelity_figure`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.craft.concepts import ClassConcepts, crops_at
from protonmf.craft.evaluation import predicted_val_images
from protonmf.craft.maps import concept_maps
from protonmf.data import ImageSource, Preprocess, load_images
from protonmf.data.sources.base import find_records
from protonmf.storage import class_stem
from protonmf.viz.concept_figures import (
    attribution_overlays, concept_sheet, concept_tree, fidelity_curves, importance_bars,
)
from protonmf.viz.png import figure_png

__all__ = ["class_figures", "mean_fidelity_figure"]


def tight_png(fig) -> bytes:
    return figure_png(fig, tight=True)


def class_figures(
    backbone: FeatureBackbone, cc: ClassConcepts, info: dict, name: str, train: ImageSource, val: ImageSource | None,
    pre: Preprocess, *, top_crops: int, eval_images: int,
) -> dict[str, bytes]:
    """The PNG files of one class (by file name): its concepts' top crops, their importance, the
    concept tree, its fidelity curves and attribution maps on held-out images.

    ``info``: the class's ``classes.json`` entry; ``top_crops`` crops per concept are drawn, and
    the maps of up to 6 of ``eval_images`` held-out images predicted as the class."""
    stem = class_stem(cc.class_idx)
    x, used = load_images(train, pre, find_records(train, info["images"]), workers=0)
    if len(used) != len(info["images"]):
        raise ValueError(f"class {name}: {len(info['images']) - len(used)} of its images can no longer be read")
    k = top_crops
    crops: dict[str, np.ndarray] = {}
    for bank in cc.banks.values():
        for i, cid in enumerate(bank.concept_ids):
            crops[cid] = pre.undo(crops_at(x, cc.boxes[bank.top_crops(i, k)]))
    root = cc.root
    sheet = np.full((len(root.concept_ids), k, *crops["c0"].shape[1:]), np.nan)
    for i, cid in enumerate(root.concept_ids):
        sheet[i, : len(crops[cid])] = crops[cid]
    files = {
        f"{stem}_concepts.png": tight_png(concept_sheet(sheet, root.importance.numpy(), class_name=name, concept_names=root.concept_ids)),
        f"{stem}_importance.png": tight_png(importance_bars(root.importance.numpy(), class_name=name, concept_names=root.concept_ids)),
        f"{stem}_tree.png": tight_png(concept_tree(info["tree"], class_name=name, crops={c: v[:3] for c, v in crops.items()})),
    }
    if "fidelity" in info:
        curves = {r: {c: np.array(info["fidelity"][r][c]) for c in ("deletion", "insertion")} for r in ("sobol", "tcav")}
        auc = {r: {c: info["fidelity"][r][f"{c}_auc"] for c in ("deletion", "insertion")} for r in ("sobol", "tcav")}
        files[f"{stem}_fidelity.png"] = tight_png(fidelity_curves(curves, auc=auc, title=name))
    if val is not None:
        images, used = predicted_val_images(backbone, val, pre, cc.class_idx, eval_images)
        if used:
            images = images[:6].to(backbone.V.device)
            maps = concept_maps(backbone, images, root.W.to(images.device), method="gradcam").cpu().numpy()
            files[f"{stem}_attribution.png"] = tight_png(attribution_overlays(
                pre.undo(images), maps, class_name=name, importance=root.importance.numpy(), top=3,
                titles=[r.image_id.rsplit("/", 1)[-1] for r in used[:6]], concept_names=root.concept_ids))
    return files


def mean_fidelity_figure(info: dict[int, dict], summary: dict[str, Any]) -> bytes:
    """The fidelity curves of every class with held-out images, averaged (curves of the common length)."""
    fid = [v["fidelity"] for v in info.values() if "fidelity" in v]
    n = min(len(f["sobol"]["deletion"]) for f in fid)
    curves = {r: {c: np.mean([f[r][c][:n] for f in fid if len(f[r][c]) == n], 0) for c in ("deletion", "insertion")}
              for r in ("sobol", "tcav")}
    auc = {r: {c: summary["fidelity"][r][f"{c}_auc"] for c in ("deletion", "insertion")} for r in ("sobol", "tcav")}
    return tight_png(fidelity_curves(curves, auc=auc, title=f"mean over {len(fid)} classes"))
