"""The steps of a run, as plain functions of a :class:`Run` (a config and what is built from it).

``tasks/`` runs these on Ray and ``flows/`` orders them with Prefect; here they know neither, and
a notebook can call them one after the other::

    run = Run(load_config("configs/demo.yaml"))
    preflight(run)
    prepared = prepare_run(run)                        # 1. weights pinned, data indexed, store opened
    run = prepared.run
    extract_features(run, range(len(prepared.class_names)))  # 2. features into the store
    for group in class_groups(len(prepared.class_names), run.config.prototypes.classes_per_task):
        fit_prototype_group(run, group)                # 3. prototypes of each group, staged
    publish_prototype_model(run)                       # 4. one model artifact, manifest last
    evaluate_prototype_model(run, run.source("val"))   # 5. against the black box, with its report

Everything a step writes is keyed by a hash of the settings it depends on, so a rerun resumes:
complete classes and groups are read, not recomputed.
"""

from protonmf.lazy import lazy_exports
from protonmf.pipeline.datasets import images_per_class, in_memory, index_data, list_split, make_split_source
from protonmf.pipeline.evaluate import (
    evaluate_prototype_model, evaluate_shard, evaluation_shards, keep_evaluation, load_published_model, published_evaluation,
)
from protonmf.pipeline.extract import ExtractionPlan, class_state, decode_group, extract_features, forward_group, plan_extraction
from protonmf.pipeline.fit import GroupFit, fit_prototype_group, published_fits
from protonmf.pipeline.prepare import Prepared, check_before_start, check_data, preflight, prepare_run, prepare_store, resolve_backbone
from protonmf.pipeline.publish import held_out_data, publish_prototype_model
from protonmf.pipeline.run import Run, load_backbone
from protonmf.pipeline.staging import Staged, class_groups, craft_key, features_key, fit_key, run_key

__all__ = [
    "GroupFit", "Prepared", "Run", "Staged", "check_data", "class_groups", "class_state", "craft_key",
    "ExtractionPlan", "plan_extraction", "keep_evaluation", "published_evaluation", "decode_group", "evaluate_prototype_model", "evaluate_shard", "evaluation_shards", "extract_features",
    "features_key", "fit_key", "fit_prototype_group", "forward_group", "held_out_data", "images_per_class",
    "in_memory", "index_data", "list_split", "load_backbone", "load_published_model",
    "make_split_source", "check_before_start", "preflight", "prepare_run", "prepare_store",
    "publish_prototype_model", "published_fits", "resolve_backbone", "run_key",
]

#: CRAFT's steps, imported on first use: a ProtoNMF run does not load CRAFT's modules (about 2 s of imports).
__getattr__, _CRAFT = lazy_exports(__name__, dict.fromkeys(("Plan", "learn_concept_group", "plan_concept_images",
                                                            "publish_concept_set"), "craft"))
__all__ += _CRAFT
