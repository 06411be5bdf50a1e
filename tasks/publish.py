"""Step 4 on Ray: the staged groups merged into the model artifact, in a task where the storage is."""

from __future__ import annotations

import ray

from protonmf import pipeline
from protonmf.pipeline import Run


@ray.remote(max_retries=2)
def _publish_prototype_model(run: Run) -> str:
    return pipeline.publish_prototype_model(run)


def publish_prototype_model(run: Run) -> str:
    """Merge the staged groups into the model artifact; its URI."""
    return ray.get(_publish_prototype_model.remote(run))
