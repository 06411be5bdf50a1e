"""Merge and publish, and evaluate, as Ray tasks: they run where the storage and GPUs are."""

from __future__ import annotations

import ray

from protonmf.config import Config
from protonmf.pipeline.prototype_run import evaluate_run, load_backbone, make_split_source, publish_model
from protonmf.data.store import FeatureStore


@ray.remote(max_retries=2)
def publish_task(config_json: str) -> str:
    config = Config.model_validate_json(config_json)
    store = FeatureStore.open(config.storage.features, storage_options=config.storage.storage_options or None)
    return publish_model(config, load_backbone(config), store)


@ray.remote(max_retries=2)
def evaluate_task(config_json: str) -> dict:
    config = Config.model_validate_json(config_json)
    return evaluate_run(config, make_split_source(config, "val"))


@ray.remote(max_retries=2)
def prepare_task(config_json: str) -> dict:
    """Pin the black box's weights (see ``resolve_backbone``) and open the feature store.

    Returns the config to use from here on (with the weights' location) and the store's classes.
    """
    from protonmf.pipeline.prototype_run import prepare_store, resolve_backbone

    config, backbone = resolve_backbone(Config.model_validate_json(config_json))
    store = prepare_store(config, backbone, make_split_source(config, "train"))
    return {"config_json": config.model_dump_json(), "class_names": store.class_names, "done": store.done_classes()}
