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
def _published_fits(run: Run, groups: list[list[int]]) -> list[GroupFit | None]:
    return pipeline.published_fits(run, groups)


def fit_prototype_groups(run: Run, groups: list[list[int]],
                         on_group: Callable[[GroupFit], None] | None = None) -> list[GroupFit]:
    """Fit every group in parallel (GPU tasks when ``compute.fit_gpus`` > 0); results in group order.

    The groups that the model at ``storage.model`` holds as this fit makes them (an unchanged
    rerun: all of them; grown data: those whose classes did not change) are read from it instead.
    """
    ref = ray.put(run)  # once, for every task
    published = ray.get(_published_fits.remote(ref, groups))
    for result in published:
        if result is not None and on_group is not None:
            on_group(result)
    todo = [g for g, result in zip(groups, published) if result is None]
    task = _fit_prototype_group.options(num_gpus=run.config.compute.fit_gpus, num_cpus=1)
    fitted = iter(gather([task.remote(ref, g) for g in todo], on_group))
    return [result if result is not None else next(fitted) for result in published]
