"""The steps of a CRAFT run, as plain functions of a :class:`~protonmf.pipeline.run.Run`.

They reuse the ProtoNMF run's feature store: its records say which class the black box predicts
for every training image (CRAFT §3.1 learns a class's concepts from the images *predicted* as
it), so the extraction step of ``protonmf run`` comes first (a finished one is reused as it is).

1. :func:`plan_concept_images`: per class, the training images the black box predicts as it.
2. :func:`learn_concept_group`: concepts, importance, sub-concepts, fidelity and localization of
   some classes, staged (:attr:`~protonmf.pipeline.run.Run.concepts`, resumable).
3. :func:`publish_concept_set`: the staged groups merged, figures drawn, published at
   ``storage.concepts`` (manifest last).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow.compute as pc
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.craft.artifact import ConceptSet, class_tensors, split_class_tensors
from protonmf.craft.concepts import ClassConcepts, class_concepts
from protonmf.craft.evaluation import evaluate_class, summarize_concepts
from protonmf.data import ImageSource, load_images
from protonmf.data.sources.base import find_records
from protonmf.pipeline.run import Run
from protonmf.pipeline.staging import class_groups

__all__ = ["Plan", "learn_concept_group", "plan_concept_images", "publish_concept_set"]

#: Per class, the training images (``image_id``, ``uri``, ``label``) the black box predicts as it.
Plan = dict[int, list[dict[str, Any]]]


def plan_concept_images(run: Run) -> Plan:
    """Per class, the training images (image id, URI, label) the black box predicts as it.

    At most ``craft.max_images_per_class``, the most confident first (largest top logit).
    """
    store = run.store
    table = store.read_records()
    table = table.filter(pc.is_null(table["skipped"]))
    pred = table["pred"].to_numpy()
    top = pc.list_element(table["top_logits"], 0).to_numpy(zero_copy_only=False).astype(np.float64)  # the top logit
    order = np.lexsort((-top, pred))  # by class, then by confidence
    ids, uris, labels = (table[name].to_pylist() for name in ("image_id", "uri", "label"))
    plan: Plan = {k: [] for k in range(len(store.class_names))}
    for i in order:
        rows = plan[int(pred[i])]
        if len(rows) < run.config.craft.max_images_per_class:
            rows.append({"image_id": ids[i], "uri": uris[i], "label": int(labels[i])})
    return plan


def learn_concept_group(
    run: Run, backbone: FeatureBackbone, plan: Plan, classes: list[int], train: ImageSource, val: ImageSource | None,
) -> dict[str, Any]:
    """CRAFT for ``classes`` (images from ``plan``), evaluated on ``val``; staged, resumable.

    Returns the group's ``classes.json`` entries (small): ``{"classes", "info", "resumed"}``.
    """
    staged = run.concepts.read(classes)
    if staged is not None:  # its marker (the .json) is written last: the group is complete
        return {"classes": classes, "info": json.loads(staged[".json"]), "resumed": True}
    config = run.config
    batch = config.compute.batch_size
    info: dict[int, dict] = {}
    todo, images, records = [], [], []
    for k in classes:
        x, used = load_images(train, run.preprocess, find_records(train, plan.get(k, [])), batch_size=batch, workers=0)
        if not used:
            info[k] = {"class_idx": k, "skipped": "no training image is predicted as this class"}
            continue
        todo.append(k)
        images.append(x)
        records.append(used)
    concepts: dict[int, ClassConcepts] = {}
    if todo:
        for cc, used in zip(class_concepts(backbone, images, todo, config.craft, batch_size=batch), records):
            k = cc.class_idx
            concepts[k] = cc
            info[k] = {
                **cc.meta(),
                "images": [{"image_id": r.image_id, "uri": r.uri, "label": r.label} for r in used],
                "tree": cc.tree(run.store.class_names[k]),
                **(evaluate_class(backbone, cc, val, run.preprocess, config.craft.eval_images_per_class, batch)
                   if val is not None else {}),
            }
    entries = {str(k): v for k, v in info.items()}
    run.concepts.write(classes, {".safetensors": save_safetensors(class_tensors(concepts)),
                                 ".json": json.dumps(entries).encode()})
    return {"classes": classes, "info": entries, "resumed": False}


def publish_concept_set(run: Run, backbone: FeatureBackbone, train: ImageSource, val: ImageSource | None) -> str:
    """Merge the staged groups, draw the figures of ``craft.figure_classes`` classes, publish.

    An artifact at ``storage.concepts`` from the same key is kept as it is.
    """
    from protonmf.viz.concept_sheets import class_figures, mean_fidelity_figure  # matplotlib: only here
    from protonmf.viz.report import render_craft_page

    config, store = run.config, run.store

    def merge(groups: list[dict[str, bytes]]) -> None:
        concepts: dict[int, ClassConcepts] = {}
        info: dict[int, dict] = {}
        for files in groups:
            part = {int(k): v for k, v in json.loads(files[".json"]).items()}
            info.update(part)
            concepts.update(split_class_tensors(load_safetensors(files[".safetensors"]),
                                                {k: v for k, v in part.items() if "banks" in v}))
        figures: dict[str, bytes] = {}
        for k in sorted(concepts)[: config.craft.figure_classes]:
            figures.update(class_figures(backbone, concepts[k], info[k], store.class_names[k], train, val, run.preprocess,
                                         top_crops=config.craft.top_crops, eval_images=config.craft.eval_images_per_class))
        summary = summarize_concepts(info)
        if "fidelity" in summary:
            figures["fidelity_all_classes.png"] = mean_fidelity_figure(info, summary)
        settings = {**config.craft.model_dump(), "craft_key": run.concepts.key, "features": store.uri}
        page = render_craft_page(summary, store.class_names, [f"figures/{n}" for n in figures],
                                 f"CRAFT concepts: {config.backbone.arch}")
        ConceptSet(store.class_names, concepts, info, backbone.spec_dict(), settings, summary, figures, page).save(
            config.storage.concepts, storage_options=run.storage_options, top_crops=config.craft.top_crops,
            keep_versions=config.storage.keep_versions)

    return run.concepts.publish(class_groups(len(store.class_names), config.craft.classes_per_task), merge, what="concepts")
