"""Feature extraction on Ray: Ray Data ``map_batches`` over class indices with an actor class.

Each actor loads the black box once (on a GPU when ``compute.extract_gpus`` > 0), extracts whole
classes, writes their chunks to the feature store itself, and returns only small metadata.

An error of our code travels back as data and is raised again on the driver as itself: Ray Data
would wrap it in a ``UserCodeException`` that has lost it (its type, its ``.cause``), and an
actor whose ``__init__`` failed would be reported as an actor that died, which looks like a lost
worker. So a ``StoreError`` stays a ``StoreError`` and :func:`tasks.runtime.is_retryable` can
tell it from a lost connection.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable

import numpy as np
import ray

from protonmf.config import Config
from protonmf.pipeline.prototype_run import extract_group, load_backbone, make_split_source
from protonmf.data.store import FeatureStore


#: What a worker returns per class (besides ``error``): the fields of ``ClassExtraction``.
FIELDS = ("k", "n_images", "n_skipped", "n_correct", "seconds", "resumed")


class FeatureExtractor:
    """A Ray Data actor: ``__init__`` loads, ``__call__`` extracts a batch of classes."""

    def __init__(self, config_json: str):
        self.failed: Exception | None = None
        try:
            self.config = Config.model_validate_json(config_json)
            self.backbone = load_backbone(self.config)
            self.source = make_split_source(self.config, "train")
            self.store = FeatureStore.open(self.config.storage.features, storage_options=self.config.storage.storage_options or None)
        except Exception as err:  # noqa: BLE001 - reported by __call__, see the module's docstring
            self.failed = err

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ks = [int(k) for k in batch["k"]]
        try:
            if self.failed is not None:
                raise self.failed
            done = [d.to_dict() for d in extract_group(self.config, self.backbone, self.source, self.store, ks)]
        except Exception as err:  # noqa: BLE001 - sent back whole, see the module's docstring
            done = [{**dict.fromkeys(FIELDS, 0), "k": k, "error": _as_data(err)} for k in ks]
        out = {name: np.array([d[name] for d in done]) for name in FIELDS}
        return {**out, "error": np.array([d.get("error", b"") for d in done], dtype=object)}


WORKER_NOTE = "in the extraction worker:\n"


def _as_data(err: Exception) -> bytes:
    """``err`` pickled, with the worker's traceback as a note (pickling drops tracebacks)."""
    if not any(note.startswith(WORKER_NOTE) for note in getattr(err, "__notes__", [])):  # once: __init__'s is sent per batch
        err.add_note(WORKER_NOTE + "".join(traceback.format_exception(err)))
    try:
        return pickle.dumps(err)
    except Exception:  # noqa: BLE001 - an exception that does not pickle: keep what it said
        return pickle.dumps(RuntimeError(f"{type(err).__name__}: {err}"))


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
        error = row.pop("error")
        if error:
            raise pickle.loads(error)
        out.append(row)
        if on_class is not None:
            on_class(row)
    return sorted(out, key=lambda r: r["k"])
