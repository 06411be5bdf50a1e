"""Step 3 on Ray: one task per group of classes (batched NMF inside), every p at once."""

from __future__ import annotations

from collections.abc import Callable

import ray

from protonmf import pipeline
from protonmf.pipeline import GroupFit, Run
from tasks.runtime import gather


@ray.remote(max_retries=3)
def _fit_prototype_group(run: Run, classes: list[int]) -> GroupFit:
    return pipeline.fit_prototype_group(run, classes)


@ray.remote(max_retries=2)
def _published_fits(run: Run, groups: list[list[int]]) -> list[GroupFit] | None:
    return pipeline.published_fits(run, groups)


def fit_prototype_groups(run: Run, groups: list[list[int]],
                         on_group: Callable[[GroupFit], None] | None = None) -> list[GroupFit]:
    """Fit every group in parallel (GPU tasks when ``compute.fit_gpus`` > 0); results in group order.

    If the model at ``storage.model`` was published from this very fit, its fits are read instead.
    """
    ref = ray.put(run)  # once, for every task
    published = ray.get(_published_fits.remote(ref, groups))
    if published is not None:
        for result in published:
            if on_group is not None:
                on_group(result)
        return published
    task = _fit_prototype_group.options(num_gpus=run.config.compute.fit_gpus, num_cpus=1)
    return gather([task.remote(ref, g) for g in groups], on_group)
