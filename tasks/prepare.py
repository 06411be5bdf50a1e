"""Step 1 on Ray: the run prepared (weights pinned, data indexed, store opened) in a task, where
the storage is (a worker, not the machine that runs the flow)."""

from __future__ import annotations

import ray

from protonmf import pipeline
from protonmf.pipeline import Prepared, Run


@ray.remote(max_retries=2)
def _prepare_run(run: Run) -> Prepared:
    return pipeline.prepare_run(run)


def prepare_run(run: Run) -> Prepared:
    """Prepare ``run`` in a Ray task (see :class:`~protonmf.pipeline.Prepared`)."""
    return ray.get(_prepare_run.remote(run))
