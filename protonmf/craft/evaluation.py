"""CRAFT's measurements (§4.3): how faithful a class's concepts are and where they lie.

- :func:`rank_and_measure`: deletion and insertion curves of one bank under the Sobol ranking and
  a TCAV-style one (Fig. 5);
- :func:`evaluate_class`: every bank of a class on held-out images predicted as it, and its root
  concepts' maps against part masks;
- :func:`compare_rankings`, :func:`summarize_concepts`: the means over banks and classes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.backbones.layer_cut import LayerCut
from protonmf.craft.concepts import ClassConcepts, encode, encode_positions, pool, pooled_head
from protonmf.craft.fidelity import concept_fidelity, tcav_ranking
from protonmf.craft.maps import maps_from_features
from protonmf.data import ImageSource, Preprocess, Record, load_images
from protonmf.evaluation.localization import class_localization

__all__ = ["MAP_METHODS", "compare_rankings", "evaluate_class", "predicted_val_images", "rank_and_measure",
           "summarize_concepts"]

MAP_METHODS = ("nnls", "gradcam")  # measured against part masks; "saliency" is drawn on demand


@torch.no_grad()
def predicted_val_images(backbone: FeatureBackbone, source: ImageSource, preprocess: Preprocess, k: int,
                         n: int) -> tuple[torch.Tensor, list[Record]]:
    """Up to ``n`` held-out images of class k that the black box predicts as k (of its first 2n),
    preprocessed, with their records."""
    images, used = load_images(source, preprocess, source.records_of(k)[: 2 * n], workers=0)
    if not used:
        return images, used
    device = backbone.V.device
    keep = (backbone.head_logits(backbone(images.to(device))).argmax(1) == k).cpu()
    idx = keep.nonzero().flatten()[:n]
    return images[idx], [used[i] for i in idx.tolist()]


def rank_and_measure(U: torch.Tensor, W: torch.Tensor, head, k: int, importance: torch.Tensor) -> dict[str, Any]:
    """Fidelity curves of one bank under the Sobol and the TCAV-style ranking (CRAFT §4.3, Fig. 5)."""
    tcav_order, tcav_score, tcav_mean = tcav_ranking(U, W, head, k)
    orders = {"sobol": importance.argsort(descending=True), "tcav": tcav_order}
    fidelity = {}
    for name, order in orders.items():
        f = concept_fidelity(U, W, head, k, order.cpu())
        fidelity[name] = {"order": order.tolist(), **{key: (v.tolist() if torch.is_tensor(v) else v) for key, v in f.items()}}
    fidelity["tcav"]["score"] = tcav_score.tolist()
    fidelity["tcav"]["mean_derivative"] = tcav_mean.tolist()
    return fidelity


def evaluate_class(backbone: FeatureBackbone, cc: ClassConcepts, val: ImageSource, preprocess: Preprocess,
                   n_images: int, batch_size: int) -> dict[str, Any]:
    """Fidelity (Sobol vs TCAV ranking) of every bank of a class, and localization of its root
    concepts, on up to ``n_images`` held-out images predicted as the class (batches of ``batch_size``).

    A root bank is measured on pooled activations through the linear head (the TCAV derivative is
    then the same for every image); a sub-bank on the per-position codes of the held-out images at
    its layer, through the rest of the network from there (``LayerCut.logits``).
    """
    images, used = predicted_val_images(backbone, val, preprocess, cc.class_idx, n_images)
    if not used:
        return {"n_eval_images": 0}
    device = backbone.V.device
    W, k = cc.W.to(device), cc.class_idx
    batches = images.split(batch_size)
    with torch.no_grad():  # one forward pass serves the encoding and every map
        F = torch.cat([backbone(b.to(device)) for b in batches])
    fidelity = rank_and_measure(encode(pool(F), W), W, pooled_head(backbone), k, cc.importance)
    sub_fidelity, at_layer = {}, {}  # layer → (its cut, the held-out images' activations there)
    for bank in cc.banks.values():
        if bank.id == "root":
            continue
        if bank.layer not in at_layer:
            cut = LayerCut(backbone, bank.layer, images.shape[-1])
            with torch.no_grad():
                at_layer[bank.layer] = cut, torch.cat([cut.activations(b.to(device)) for b in batches]).clamp_min(0)
        cut, acts = at_layer[bank.layer]
        Wb = bank.W.to(device)
        sub_fidelity[bank.id] = {"layer": bank.layer,
                                 **rank_and_measure(encode_positions(acts, Wb), Wb, cut.logits, k, bank.importance)}
    out: dict[str, Any] = {"n_eval_images": len(used), "fidelity": fidelity}
    if sub_fidelity:
        out["sub_fidelity"] = sub_fidelity
    if hasattr(val, "mask") and getattr(val, "part_names", None):
        masks = torch.from_numpy(np.stack([val.mask(r) for r in used]))
        if masks.shape[1:] == images.shape[2:]:
            n_parts = len(val.part_names) - 1
            out["localization"] = {
                m: class_localization(maps_from_features(F, W, images.shape[-2:], method=m).cpu(), masks, n_parts)
                for m in MAP_METHODS
            }
    return out


def compare_rankings(fid: list[dict]) -> dict[str, Any]:
    """Means over banks of each ranking's AUCs, and in what share of banks each one wins."""
    out: dict[str, Any] = {
        name: {f"{curve}_auc": float(np.mean([f[name][f"{curve}_auc"] for f in fid])) for curve in ("deletion", "insertion")}
        for name in ("sobol", "tcav")
    }
    sobol, tcav = ([f[name]["deletion_auc"] for f in fid] for name in ("sobol", "tcav"))
    out["sobol_deletion_lower"] = float(np.mean([a < b for a, b in zip(sobol, tcav)]))
    out["tcav_deletion_lower"] = float(np.mean([b < a for a, b in zip(sobol, tcav)]))
    out["sobol_insertion_higher"] = float(np.mean([f["sobol"]["insertion_auc"] > f["tcav"]["insertion_auc"] for f in fid]))
    out["same_order"] = float(np.mean([f["sobol"]["order"] == f["tcav"]["order"] for f in fid]))
    # a TCAV score strictly between 0 and 1: the derivative's sign differs between images
    scores = [x for f in fid for x in f["tcav"]["score"]]
    out["tcav_scores_between_0_and_1"] = float(np.mean([0 < x < 1 for x in scores]))
    return out


def summarize_concepts(info: dict[int, dict]) -> dict[str, Any]:
    """The concept set's summary from every class's ``classes.json`` entry: classes with concepts,
    those skipped, sub-banks, mean fidelity of root and sub banks, mean localization."""
    fid = [v["fidelity"] for v in info.values() if "fidelity" in v]
    out: dict[str, Any] = {
        "classes": sum("banks" in v for v in info.values()),
        "skipped_classes": sorted(k for k, v in info.items() if "skipped" in v),
        "sub_banks": sum(len(v["banks"]) - 1 for v in info.values() if "banks" in v),
    }
    if fid:
        out["fidelity"] = {**compare_rankings(fid), "classes": len(fid)}
    sub = [f for v in info.values() for f in v.get("sub_fidelity", {}).values()]
    if sub:
        out["sub_fidelity"] = {**compare_rankings(sub), "banks": len(sub)}
    locs = [v["localization"] for v in info.values() if "localization" in v]
    if locs:
        out["localization"] = {
            m: {key: float(np.mean([np.mean(loc[m][key]) for loc in locs])) for key in ("on_object", "purity", "coverage", "iou")}
            for m in MAP_METHODS
        }
    return out
