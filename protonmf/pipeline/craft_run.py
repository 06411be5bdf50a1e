"""The steps of a CRAFT run, as plain functions of a :class:`~protonmf.config.Config`.

``tasks/craft.py`` runs them on Ray and ``flows/craft.py`` orders them with Prefect; a notebook
can call them one after the other. They reuse the ProtoNMF run's feature store: its records say
which class the black box predicts for every training image (CRAFT §3.1 learns a class's concepts
from the images *predicted* as it), so the extraction step of ``protonmf run`` comes first (a
finished one is reused as it is).

1. :func:`predicted_images`: per class, the training images the black box predicts as it.
2. :func:`craft_group`: concepts, importance, sub-concepts, fidelity and localization of some
   classes, staged under ``<storage.concepts>.staging/<key>/`` (resumable).
3. :func:`publish_concepts`: the staged groups merged, figures drawn, published at
   ``storage.concepts`` (manifest last).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.backbones.layer_cut import LayerCut
from protonmf.config import Config
from protonmf.craft.concepts import (
    ClassConcepts,
    class_concepts,
    crops_at,
    encode,
    encode_positions,
    pool,
    pooled_head,
)
from protonmf.craft.artifact import ConceptSet, class_tensors, split_class_tensors
from protonmf.craft.fidelity import concept_fidelity, tcav_ranking
from protonmf.craft.maps import concept_maps, maps_from_features
from protonmf.data import ImageSource, Record, load_images
from protonmf.evaluation.localization import class_localization
from protonmf.viz.report import render_craft_page
from protonmf.pipeline.prototype_run import make_preprocess
from protonmf.pipeline.staging import class_groups, group_stem, published_key, run_key, staging_dir
from protonmf.viz.png import figure_png
from protonmf.storage import class_stem, join, read_bytes, write_bytes_atomic
from protonmf.data.store import FeatureStore

__all__ = ["craft_group", "craft_key", "predicted_images", "publish_concepts"]

MAP_METHODS = ("nnls", "gradcam")  # measured against part masks; "saliency" is drawn on demand


def craft_key(config: Config, store: FeatureStore) -> str:
    return run_key(features=store.key, craft=config.craft.model_dump(), val=config.data.val,
                       val_images=config.data.val_images_per_class)


def predicted_images(config: Config, store: FeatureStore) -> dict[int, list[dict]]:
    """Per class, the training images (image id, URI, label) the black box predicts as it.

    At most ``craft.max_images_per_class``, the most confident first (largest top logit).
    """
    table = store.read_records()
    table = table.filter(pc.is_null(table["skipped"]))
    pred = table["pred"].to_numpy()
    top = pc.list_element(table["top_logits"], 0).to_numpy(zero_copy_only=False).astype(np.float64)  # the top logit
    order = np.lexsort((-top, pred))  # by class, then by confidence
    ids, uris, labels = (table[name].to_pylist() for name in ("image_id", "uri", "label"))
    plan: dict[int, list[dict]] = {k: [] for k in range(len(store.class_names))}
    for i in order:
        rows = plan[int(pred[i])]
        if len(rows) < config.craft.max_images_per_class:
            rows.append({"image_id": ids[i], "uri": uris[i], "label": int(labels[i])})
    return plan


def _records(source: ImageSource, wanted: list[dict]) -> list[Record]:
    by_label: dict[int, dict[str, Record]] = {}
    out = []
    for w in wanted:
        index = by_label.setdefault(w["label"], {r.image_id: r for r in source.records_of(w["label"])})
        if w["image_id"] not in index:
            raise ValueError(f"data.train: image {w['image_id']!r} of the feature store is no longer in the data")
        out.append(index[w["image_id"]])
    return out


@torch.no_grad()
def _predicted_val_images(config: Config, backbone: FeatureBackbone, source: ImageSource, k: int) -> tuple[torch.Tensor, list[Record]]:
    n = config.craft.eval_images_per_class
    images, used = load_images(source, make_preprocess(config), source.records_of(k)[: 2 * n], workers=0)
    if not used:
        return images, used
    device = backbone.V.device
    keep = (backbone.head_logits(backbone(images.to(device))).argmax(1) == k).cpu()
    idx = keep.nonzero().flatten()[:n]
    return images[idx], [used[i] for i in idx.tolist()]


def _rank_and_measure(U: torch.Tensor, W: torch.Tensor, head, k: int, importance: torch.Tensor) -> dict[str, Any]:
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


def _evaluate_class(config: Config, backbone: FeatureBackbone, cc: ClassConcepts, val: ImageSource) -> dict[str, Any]:
    """Fidelity (Sobol vs TCAV ranking) of every bank of a class, and localization of its root
    concepts, on held-out images.

    A root bank is measured on pooled activations through the linear head (the TCAV derivative is
    then the same for every image); a sub-bank on the per-position codes of the held-out images at
    its layer, through the rest of the network from there (``LayerCut.logits``).
    """
    images, used = _predicted_val_images(config, backbone, val, cc.class_idx)
    if not used:
        return {"n_eval_images": 0}
    device = backbone.V.device
    W, k = cc.W.to(device), cc.class_idx
    batches = images.split(config.compute.batch_size)
    with torch.no_grad():  # one forward pass serves the encoding and every map
        F = torch.cat([backbone(b.to(device)) for b in batches])
    fidelity = _rank_and_measure(encode(pool(F), W), W, pooled_head(backbone), k, cc.importance)
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
                                 **_rank_and_measure(encode_positions(acts, Wb), Wb, cut.logits, k, bank.importance)}
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


def craft_group(
    config: Config,
    backbone: FeatureBackbone,
    store: FeatureStore,
    plan: dict[int, list[dict]],
    classes: list[int],
    train: ImageSource,
    val: ImageSource | None,
) -> dict[str, Any]:
    """CRAFT for ``classes`` (images from ``plan``), evaluated on ``val``; staged, resumable.

    Returns the group's ``classes.json`` entries (small).
    """
    key = craft_key(config, store)
    fs, staging = staging_dir(config.storage.concepts, key, config.storage.storage_options or None)
    base = join(staging, group_stem(classes))
    if fs.exists(base + ".json"):  # written last: the group is complete
        return {"classes": classes, "info": json.loads(read_bytes(fs, base + ".json")), "resumed": True}
    pre = make_preprocess(config)
    info: dict[int, dict] = {}
    todo, images, records = [], [], []
    for k in classes:
        recs = _records(train, plan.get(k, []))
        x, used = load_images(train, pre, recs, batch_size=config.compute.batch_size, workers=0)
        if not used:
            info[k] = {"class_idx": k, "skipped": "no training image is predicted as this class"}
            continue
        todo.append(k)
        images.append(x)
        records.append(used)
    concepts: dict[int, ClassConcepts] = {}
    if todo:
        for cc, used in zip(class_concepts(backbone, images, todo, config.craft, batch_size=config.compute.batch_size), records):
            k = cc.class_idx
            concepts[k] = cc
            info[k] = {
                **cc.meta(),
                "images": [{"image_id": r.image_id, "uri": r.uri, "label": r.label} for r in used],
                "tree": cc.tree(store.class_names[k]),
                **(_evaluate_class(config, backbone, cc, val) if val is not None else {}),
            }
    write_bytes_atomic(fs, base + ".safetensors", save_safetensors(class_tensors(concepts)))
    write_bytes_atomic(fs, base + ".json", json.dumps({str(k): v for k, v in info.items()}).encode())
    return {"classes": classes, "info": {str(k): v for k, v in info.items()}, "resumed": False}


def _compare(fid: list[dict]) -> dict[str, Any]:
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


def _summary(info: dict[int, dict]) -> dict[str, Any]:
    fid = [v["fidelity"] for v in info.values() if "fidelity" in v]
    out: dict[str, Any] = {
        "classes": sum("banks" in v for v in info.values()),
        "skipped_classes": sorted(k for k, v in info.items() if "skipped" in v),
        "sub_banks": sum(len(v["banks"]) - 1 for v in info.values() if "banks" in v),
    }
    if fid:
        out["fidelity"] = {**_compare(fid), "classes": len(fid)}
    sub = [f for v in info.values() for f in v.get("sub_fidelity", {}).values()]
    if sub:
        out["sub_fidelity"] = {**_compare(sub), "banks": len(sub)}
    locs = [v["localization"] for v in info.values() if "localization" in v]
    if locs:
        out["localization"] = {
            m: {key: float(np.mean([np.mean(loc[m][key]) for loc in locs])) for key in ("on_object", "purity", "coverage", "iou")}
            for m in MAP_METHODS
        }
    return out


def _png(fig) -> bytes:
    return figure_png(fig, tight=True)


def _class_figures(
    config: Config, backbone: FeatureBackbone, cc: ClassConcepts, info: dict, name: str, train: ImageSource, val: ImageSource | None
) -> dict[str, bytes]:
    from protonmf.viz import concept_figures as cf

    pre = make_preprocess(config)
    stem = class_stem(cc.class_idx)
    x, used = load_images(train, pre, _records(train, info["images"]), workers=0)
    if len(used) != len(info["images"]):
        raise ValueError(f"class {name}: {len(info['images']) - len(used)} of its images can no longer be read")
    k = config.craft.top_crops
    crops: dict[str, np.ndarray] = {}
    for bank in cc.banks.values():
        for i, cid in enumerate(bank.concept_ids):
            crops[cid] = pre.undo(crops_at(x, cc.boxes[bank.top_crops(i, k)]))
    root = cc.root
    sheet = np.full((len(root.concept_ids), k, *crops["c0"].shape[1:]), np.nan)
    for i, cid in enumerate(root.concept_ids):
        sheet[i, : len(crops[cid])] = crops[cid]
    files = {
        f"{stem}_concepts.png": _png(cf.concept_sheet(sheet, root.importance.numpy(), class_name=name, concept_names=root.concept_ids)),
        f"{stem}_importance.png": _png(cf.importance_bars(root.importance.numpy(), class_name=name, concept_names=root.concept_ids)),
        f"{stem}_tree.png": _png(cf.concept_tree(info["tree"], class_name=name, crops={c: v[:3] for c, v in crops.items()})),
    }
    if "fidelity" in info:
        curves = {r: {c: np.array(info["fidelity"][r][c]) for c in ("deletion", "insertion")} for r in ("sobol", "tcav")}
        auc = {r: {c: info["fidelity"][r][f"{c}_auc"] for c in ("deletion", "insertion")} for r in ("sobol", "tcav")}
        files[f"{stem}_fidelity.png"] = _png(cf.fidelity_curves(curves, auc=auc, title=name))
    if val is not None:
        images, used = _predicted_val_images(config, backbone, val, cc.class_idx)
        if used:
            images = images[:6].to(backbone.V.device)
            maps = concept_maps(backbone, images, root.W.to(images.device), method="gradcam").cpu().numpy()
            files[f"{stem}_attribution.png"] = _png(cf.attribution_overlays(
                pre.undo(images), maps, class_name=name, importance=root.importance.numpy(), top=3,
                titles=[r.image_id.rsplit("/", 1)[-1] for r in used[:6]], concept_names=root.concept_ids))
    return files


def publish_concepts(
    config: Config, backbone: FeatureBackbone, store: FeatureStore, train: ImageSource, val: ImageSource | None
) -> str:
    """Merge the staged groups, draw the figures of ``craft.figure_classes`` classes, publish.

    An artifact at ``storage.concepts`` from the same key is kept as it is.
    """
    key = craft_key(config, store)
    uri, opts = config.storage.concepts, config.storage.storage_options or None
    if published_key(uri, "craft_key", opts) == key:
        return uri
    fs, staging = staging_dir(uri, key, opts)
    concepts: dict[int, ClassConcepts] = {}
    info: dict[int, dict] = {}
    for classes in class_groups(len(store.class_names), config.craft.classes_per_task):
        base = join(staging, group_stem(classes))
        if not fs.exists(base + ".json"):
            raise FileNotFoundError(f"the concepts of classes {classes[0]}–{classes[-1]} are missing at {base}.json")
        part = {int(k): v for k, v in json.loads(read_bytes(fs, base + ".json")).items()}
        info.update(part)
        concepts.update(split_class_tensors(load_safetensors(read_bytes(fs, base + ".safetensors")),
                                            {k: v for k, v in part.items() if "banks" in v}))
    figures: dict[str, bytes] = {}
    for k in sorted(concepts)[: config.craft.figure_classes]:
        figures.update(_class_figures(config, backbone, concepts[k], info[k], store.class_names[k], train, val))
    summary = _summary(info)
    if "fidelity" in summary:
        from protonmf.viz import concept_figures as cf

        fid = [v["fidelity"] for v in info.values() if "fidelity" in v]
        n = min(len(f["sobol"]["deletion"]) for f in fid)
        curves = {r: {c: np.mean([f[r][c][:n] for f in fid if len(f[r][c]) == n], 0) for c in ("deletion", "insertion")}
                  for r in ("sobol", "tcav")}
        auc = {r: {c: summary["fidelity"][r][f"{c}_auc"] for c in ("deletion", "insertion")} for r in ("sobol", "tcav")}
        figures["fidelity_all_classes.png"] = _png(cf.fidelity_curves(curves, auc=auc, title=f"mean over {len(fid)} classes"))
    settings = {**config.craft.model_dump(), "craft_key": key, "features": store.uri}
    page = render_craft_page(summary, store.class_names, [f"figures/{n}" for n in figures], f"CRAFT concepts: {config.backbone.arch}")
    ConceptSet(store.class_names, concepts, info, backbone.spec_dict(), settings, summary, figures, page).save(
        uri, storage_options=opts, top_crops=config.craft.top_crops, keep_versions=config.storage.keep_versions)
    fs.rm(staging, recursive=True)
    return uri
