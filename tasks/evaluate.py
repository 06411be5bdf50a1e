"""Step 5 on Ray: the evaluation, spread over the cluster like the extraction:

    held-out records ──▶ shards ──▶ HeldOutEvaluator actors (a pool) ──▶ merged statistics ──▶ finish task

- the held-out records (read from the run's dataset index, never listed) are cut into contiguous
  shards of ``evaluation.shard_images`` records (:func:`~protonmf.pipeline.evaluation_shards`);
- a pool of **HeldOutEvaluator** actors, each loading the published model and the held-out source
  once (``num_gpus=compute.extract_gpus``), as many as the cluster holds now
  (:func:`tasks.extract.extract_pool_size`), measures the shards, a free actor taking the next one;
- the driver merges their statistics exactly (:func:`~protonmf.evaluation.held_out.merge_held_out`),
  and one task computes the JSON from them, the reconstruction study and the report.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ray
from ray.util import ActorPool

from protonmf import pipeline
from protonmf.evaluation.held_out import HeldOutStats, merge_held_out
from protonmf.pipeline import Run
from tasks.extract import extract_pool_size


class HeldOutEvaluator:
    """An actor: ``__init__`` loads the published model and the held-out source (its index rows)
    once, :meth:`evaluate` measures one shard of the records."""

    def __init__(self, run: Run):
        self.failed: Exception | None = None
        self.run = run
        try:
            self.model = pipeline.load_published_model(run)
            self.source = run.source("val")
        except Exception as err:  # noqa: BLE001 - raised by evaluate, where it keeps its type (a dead actor would not)
            self.failed = err

    def evaluate(self, start: int, stop: int) -> tuple[HeldOutStats, dict]:
        if self.failed is not None:
            raise self.failed
        stats = pipeline.evaluate_shard(self.run, self.model, self.source, start, stop)
        return stats, {"start": start, "stop": stop, "n_images": stats.n_images, "n_skipped": stats.n_skipped,
                       "worker": os.getpid()}


@ray.remote(max_retries=2)
def _finish(run: Run, stats: HeldOutStats) -> dict:
    return pipeline.evaluate_prototype_model(run, run.source("val"), stats)


def evaluate_prototype_model(run: Run, on_shard: Callable[[dict], None] | None = None) -> tuple[dict[str, Any], list[dict]]:
    """Evaluate the published model on the held-out images, shard by shard on a pool of actors,
    and write its report.

    Returns the evaluation's JSON (as :func:`~protonmf.evaluation.held_out.evaluate_model` and
    ``protonmf evaluate`` give it) and one row per shard, in record order: ``start``, ``stop``,
    ``n_images``, ``n_skipped`` and ``worker`` (the pid of the actor that measured it);
    ``on_shard`` is called with each row as it comes (progress). A rerun whose model, held-out
    data and settings are those of the evaluation kept beside the model takes that one: no image read.
    """
    kept = pipeline.published_evaluation(run)
    if kept is not None:
        return kept
    compute = run.config.compute
    source = run.source("val")  # from the index: the records' count, nothing listed
    shards = pipeline.evaluation_shards(run, len(source.records))
    if not shards:
        raise ValueError(f"evaluation: no held-out images in {source!r}")
    ref = ray.put(run)
    # A fixed pool, so only the actors the cluster holds now: one that could never be placed would
    # keep the shards handed to it waiting forever.
    size = extract_pool_size(ray.cluster_resources(), compute.extract_gpus, len(shards), compute.max_extract_workers)
    # A lost actor is restarted and its shard measured again, as Ray retries a task (max_retries).
    actor = ray.remote(HeldOutEvaluator).options(num_gpus=compute.extract_gpus, num_cpus=1, max_restarts=2,
                                                 max_task_retries=2)
    actors = [actor.remote(ref) for _ in range(size)]
    parts, rows = [], []
    try:
        for stats, row in ActorPool(actors).map(lambda a, bounds: a.evaluate.remote(*bounds), shards):
            parts.append(stats)
            rows.append(row)
            if on_shard is not None:
                on_shard(row)
    finally:
        for a in actors:  # their GPUs go back before the finishing task asks for one
            ray.kill(a)
    finish = _finish.options(num_gpus=compute.extract_gpus)
    evaluation = ray.get(finish.remote(ref, merge_held_out(parts)))
    pipeline.keep_evaluation(run, evaluation, rows)
    return evaluation, rows
