"""Merge and publish, and evaluate, as Ray tasks: they run where the storage and GPUs are."""

from __future__ import annotations

import ray

from protonmf.config import Config
from protonmf.data.store import FeatureStore
from protonmf.pipeline.prototype_run import evaluate_run, load_backbone, make_split_source, publish_model


@ray.remote(max_retries=2)
def _publish(config_json: str) -> str:
    config = Config.model_validate_json(config_json)
    store = FeatureStore.open(config.storage.features, storage_options=config.storage.storage_options or None)
    return publish_model(config, load_backbone(config), store)


@ray.remote(max_retries=2)
def _evaluate(config_json: str) -> dict:
    config = Config.model_validate_json(config_json)
    return evaluate_run(config, make_split_source(config, "val"))


def publish_on_ray(config: Config) -> str:
    """Merge the staged groups into the model artifact; its URI."""
    return ray.get(_publish.remote(config.model_dump_json()))


def evaluate_on_ray(config: Config) -> dict:
    """Evaluate the published model (and write its report); the evaluation's JSON.

    A forward pass over images like the extraction: it asks Ray for ``compute.extract_gpus``."""
    task = _evaluate.options(num_gpus=config.compute.extract_gpus)
    return ray.get(task.remote(config.model_dump_json()))
