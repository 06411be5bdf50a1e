"""Prototype fitting on Ray: one task per group of classes (batched NMF inside), every p at once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import ray

from protonmf.config import Config
from protonmf.data.store import FeatureStore
from protonmf.pipeline.prototype_run import fit_group, published_fits
from tasks.runtime import gather, maybe_fail_for_test


def _store(config: Config) -> FeatureStore:
    return FeatureStore.open(config.storage.features, storage_options=config.storage.storage_options or None)


@ray.remote(max_retries=3)
def _fit_group(config_json: str, classes: list[int]) -> dict:
    maybe_fail_for_test()
    config = Config.model_validate_json(config_json)
    return asdict(fit_group(config, _store(config), classes))


@ray.remote(max_retries=2)
def _published_fits(config_json: str, groups: list[list[int]]) -> list[dict] | None:
    config = Config.model_validate_json(config_json)
    fits = published_fits(config, _store(config), groups)
    return None if fits is None else [asdict(f) for f in fits]


def fit_on_ray(config: Config, groups: list[list[int]], on_group: Callable[[dict], None] | None = None) -> list[dict]:
    """Fit every group in parallel (GPU tasks when ``compute.fit_gpus`` > 0); results in group order.

    If the model at ``storage.model`` was published from this very fit, its fits are read instead.
    """
    config_json = config.model_dump_json()
    published = ray.get(_published_fits.remote(config_json, groups))
    if published is not None:
        for result in published:
            if on_group is not None:
                on_group(result)
        return published
    task = _fit_group.options(num_gpus=config.compute.fit_gpus, num_cpus=1)
    return gather([task.remote(config_json, g) for g in groups], on_group)
