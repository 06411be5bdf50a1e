"""Prototype fitting on Ray: one task per group of classes (batched NMF inside), every p at once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import ray

from protonmf.config import Config
from protonmf.pipeline.prototype_run import fit_group
from protonmf.data.store import FeatureStore
from tasks.runtime import gather, maybe_fail_for_test


@ray.remote(max_retries=3)
def _fit_group(config_json: str, classes: list[int]) -> dict:
    maybe_fail_for_test()
    config = Config.model_validate_json(config_json)
    store = FeatureStore.open(config.storage.features, storage_options=config.storage.storage_options or None)
    return asdict(fit_group(config, store, classes))


def fit_on_ray(config: Config, groups: list[list[int]], on_group: Callable[[dict], None] | None = None) -> list[dict]:
    """Fit every group in parallel (GPU tasks when ``compute.fit_gpus`` > 0); results in group order."""
    task = _fit_group.options(num_gpus=config.compute.fit_gpus, num_cpus=1)
    config_json = config.model_dump_json()
    return gather([task.remote(config_json, g) for g in groups], on_group)
