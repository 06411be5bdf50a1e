"""Feature extraction on Ray: Ray Data ``map_batches`` over class indices with an actor class.

Each actor loads the black box once (on a GPU when ``compute.extract_gpus`` > 0), extracts whole
classes, writes their chunks to the feature store itself, and returns only small metadata.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import ray

from protonmf.config import Config
from protonmf.pipeline.prototype_run import extract_group, load_backbone, make_split_source
from protonmf.data.store import FeatureStore


class FeatureExtractor:
    """A Ray Data actor: ``__init__`` loads, ``__call__`` extracts a batch of classes."""

    def __init__(self, config_json: str):
        self.config = Config.model_validate_json(config_json)
        self.backbone = load_backbone(self.config)
        self.source = make_split_source(self.config, "train")
        self.store = FeatureStore.open(self.config.storage.features, storage_options=self.config.storage.storage_options or None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = extract_group(self.config, self.backbone, self.source, self.store, [int(k) for k in batch["k"]])
        return {name: np.array([getattr(d, name) for d in done]) for name in ("k", "n_images", "n_skipped", "n_correct", "seconds", "resumed")}


def extract_on_ray(config: Config, classes: list[int], on_class: Callable[[dict], None] | None = None) -> list[dict]:
    """Extract ``classes`` with a pool of actors; returns one small dict per class."""
    compute = config.compute
    ds = ray.data.from_items([{"k": k} for k in classes], override_num_blocks=max(1, len(classes)))
    ds = ds.map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={"config_json": config.model_dump_json()},
        batch_size=1,
        concurrency=compute.workers,
        num_gpus=compute.extract_gpus,
        num_cpus=1,
        max_restarts=2,
        max_task_retries=2,
    )
    out = []
    for row in ds.iter_rows():
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        out.append(row)
        if on_class is not None:
            on_class(row)
    return sorted(out, key=lambda r: r["k"])
