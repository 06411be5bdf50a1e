"""CRAFT on Ray: a task plans the images, one task per group of classes extracts their concepts
(batched NMF inside), a task merges and publishes."""

from __future__ import annotations

import json
from collections.abc import Callable

import ray

from protonmf.config import Config
from protonmf.devices import step_device
from protonmf.pipeline.craft_run import craft_group, predicted_images, publish_concepts
from protonmf.pipeline.prototype_run import load_backbone, make_split_source
from protonmf.data.store import FeatureStore
from tasks.runtime import gather, maybe_fail_for_test


def _open(config: Config, gpus: float, train_labels: list[int] | None = None, val_labels: list[int] | None = None):
    """The store, the black box on the task's device (CUDA if it was given ``gpus`` > 0), and the
    two splits (only the index rows of the labels given, if any)."""
    device = step_device(gpus, "compute.extract_gpus")  # before any I/O: a worker without CUDA fails at once
    store = FeatureStore.open(config.storage.features, storage_options=config.storage.storage_options or None)
    backbone = load_backbone(config).to(device)
    return (store, backbone, make_split_source(config, "train", labels=train_labels),
            make_split_source(config, "val", labels=val_labels))


@ray.remote(max_retries=2)
def _plan(config_json: str) -> str:
    config = Config.model_validate_json(config_json)
    store = FeatureStore.open(config.storage.features, storage_options=config.storage.storage_options or None)
    return json.dumps(predicted_images(config, store))


@ray.remote(max_retries=3)
def _craft_group(config_json: str, plan_json: str, classes: list[int]) -> dict:
    maybe_fail_for_test()
    config = Config.model_validate_json(config_json)
    plan = {int(k): v for k, v in json.loads(plan_json).items()}
    # the images predicted as these classes carry their own (true) labels; the GPUs are the ones craft_on_ray asks Ray for
    labels = sorted({w["label"] for k in classes for w in plan.get(k, [])})
    store, backbone, train, val = _open(config, config.compute.extract_gpus, labels, classes)
    return craft_group(config, backbone, store, plan, classes, train, val)


@ray.remote(max_retries=2)
def _publish_concepts(config_json: str) -> str:
    config = Config.model_validate_json(config_json)
    store, backbone, train, val = _open(config, 0)  # figures of a few classes: no GPU asked for
    return publish_concepts(config, backbone, store, train, val)


def plan_on_ray(config: Config) -> dict[int, list[dict]]:
    """Per class, the training images the black box predicts as it (see ``predicted_images``)."""
    return {int(k): v for k, v in json.loads(ray.get(_plan.remote(config.model_dump_json()))).items()}


def publish_concepts_on_ray(config: Config) -> str:
    """Merge the staged groups, draw the figures, publish the concept set; its URI."""
    return ray.get(_publish_concepts.remote(config.model_dump_json()))


def craft_on_ray(config: Config, groups: list[list[int]], plan: dict[int, list[dict]],
              on_group: Callable[[dict], None] | None = None) -> list[dict]:
    """Every group in parallel (GPU tasks when ``compute.extract_gpus`` > 0); results in group order."""
    task = _craft_group.options(num_gpus=config.compute.extract_gpus, num_cpus=1)
    config_json = config.model_dump_json()
    return gather([task.remote(config_json, json.dumps({k: plan.get(k, []) for k in g}), g) for g in groups], on_group)
