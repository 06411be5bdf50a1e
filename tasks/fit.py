"""Prototype fitting on Ray: one task per group of classes (batched NMF inside), every p at once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import ray

from protonmf.config import Config
from protonmf.stages import fit_group
from protonmf.store import FeatureStore
from tasks.runtime import maybe_fail_for_test


@ray.remote(max_retries=3)
def fit_group_task(config_json: str, classes: list[int]) -> dict:
    maybe_fail_for_test()
    config = Config.model_validate_json(config_json)
    store = FeatureStore.open(config.storage.features, storage_options=config.storage.storage_options or None)
    return asdict(fit_group(config, store, classes))


def fit_all(config: Config, groups: list[list[int]], on_group: Callable[[dict], None] | None = None) -> list[dict]:
    """Fit every group in parallel (GPU tasks when ``compute.fit_gpus`` > 0); results in group order."""
    task = fit_group_task.options(num_gpus=config.compute.fit_gpus, num_cpus=1)
    config_json = config.model_dump_json()
    pending = {task.remote(config_json, g): i for i, g in enumerate(groups)}
    results: list[dict | None] = [None] * len(groups)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            i = pending.pop(ref)
            results[i] = ray.get(ref)
            if on_group is not None:
                on_group(results[i])
    return results  # type: ignore[return-value]
