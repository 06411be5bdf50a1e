"""Feature extraction on Ray: a Ray Data pipeline over the classes still to extract.

    classes ──▶ decode (CPU tasks) ──▶ FeatureExtractor (an autoscaling pool of actors) ──▶ summaries

- **decode**, one Ray task per class (``num_cpus=1``): reads the class's rows of the dataset index
  (never a listing), reads and decodes its images on a few threads, resizes and crops them, and
  hands the class on as one (n, 3, S, S) uint8 tensor (a quarter of float32's bytes).
- **FeatureExtractor**, an actor holding the black box (``num_gpus=compute.extract_gpus``):
  normalizes, forwards, and writes the whole class to the feature store itself (one writer per
  class, chunk-aligned), returning a few numbers.

Ray Data streams one into the other, so every CPU of the cluster decodes while the GPUs forward.
The actor pool starts with what the cluster holds and grows to what it can hold
(:func:`extract_pool_bounds`). With
``extract_gpus: 0`` both stages ask for the same resources and Ray Data fuses them: each CPU actor
then decodes and forwards its own classes, one core each, which is what a CPU-only cluster wants.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import traceback
from collections.abc import Callable, Mapping

import numpy as np
import ray
import torch

from protonmf.config import Config
from protonmf.data.extract import ClassExtraction, DecodedClass, damaged_or_missing
from protonmf.data.store import FeatureStore
from protonmf.pipeline.prototype_run import decode_group, forward_group, load_backbone
from protonmf.storage import class_stem
from tasks.runtime import die_before_writing_for_test

SUMMARY = ("k", "n_images", "n_skipped", "n_correct", "seconds", "resumed")


def extract_pool_size(capacity: Mapping[str, float], extract_gpus: float, n_classes: int, cap: int | None = None) -> int:
    """The most extraction actors worth starting: as many as ``capacity`` holds, at most ``cap``
    and at most one per class (never below 1).

    Each actor takes ``extract_gpus`` GPUs and one CPU; on CPUs alone (``extract_gpus`` = 0) one CPU.

    >>> extract_pool_size({"CPU": 64, "GPU": 8}, 1, 1000)
    8
    >>> extract_pool_size({"CPU": 64, "GPU": 8}, 0.5, 1000, cap=12)
    12
    >>> extract_pool_size({"CPU": 2}, 0, 1000)
    2
    """
    by_cpu = math.floor(capacity.get("CPU", 0))
    most = by_cpu if extract_gpus == 0 else min(math.floor(capacity.get("GPU", 0) / extract_gpus), by_cpu)
    if cap is not None:
        most = min(most, cap)
    return max(1, min(most, n_classes))


def extract_pool_bounds(
    now: Mapping[str, float], most: Mapping[str, float] | None, extract_gpus: float, n_classes: int,
    cap: int | None = None,
) -> tuple[int, int]:
    """(initial, largest) size of the actor pool: it starts with what the cluster holds ``now`` and
    grows, as Ray Data's autoscaling pool does, up to what the cluster can hold at ``most`` (its
    autoscaler's largest configuration). Ray knows that only from autoscaler v2; without it
    (autoscaler v1, a fixed cluster: ``most`` None) the pool may grow to ``cap``
    (``compute.max_extract_workers``) if given, the actors it adds waiting for the nodes that Ray
    Data asks the autoscaler for, else it keeps what the cluster holds now.

    >>> extract_pool_bounds({"CPU": 16, "GPU": 1}, {"CPU": 256, "GPU": 16}, 1, 1000)
    (1, 16)
    >>> extract_pool_bounds({"CPU": 16, "GPU": 1}, None, 1, 1000, cap=16)
    (1, 16)
    >>> extract_pool_bounds({"CPU": 16, "GPU": 1}, None, 1, 1000)
    (1, 1)
    """
    initial = extract_pool_size(now, extract_gpus, n_classes, cap)
    if most is not None:
        largest = extract_pool_size(most, extract_gpus, n_classes, cap)
    else:
        largest = min(cap, n_classes) if cap is not None else initial
    return initial, max(initial, largest)


def cluster_most() -> dict[str, float] | None:
    """The resources of the cluster's largest configuration, if its autoscaler tells Ray (v2 does;
    Ray Data sizes its own shuffles the same way), else None."""
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: without it, not known
        most = None
    return dict(most) if most else None


def _decode(batch: dict[str, np.ndarray], config_json: str) -> dict[str, np.ndarray]:
    """Ray Data stage 1 (CPU): check the batch's one class if it is complete (read back against its
    checksums: an intact class is passed on as resumed, undecoded), else decode it."""
    config = Config.model_validate_json(config_json)
    k = int(batch["k"][0])
    store = FeatureStore.open(config.storage.features, storage_options=config.storage.storage_options or None)
    todo, _, damage = damaged_or_missing(store, k)
    if todo:
        (decoded,) = decode_group(config, [k])
        decoded.damage = damage  # the actor needs it, and must not read the class again to find it
    else:
        S = config.data.preprocess.crop
        decoded = DecodedClass(k, torch.zeros(0, 3, S, S, dtype=torch.uint8), [])
    return {
        "k": np.array([decoded.k]),
        "images": decoded.images.numpy()[None],  # (1, n, 3, S, S) uint8
        "entries": np.array([json.dumps(decoded.entries)]),
        "decode_seconds": np.array([decoded.seconds]),
        "decoder": np.array([os.getpid()]),
        "resumed": np.array([not todo]),
        "damage": np.array([damage or ""]),
    }


class FeatureExtractor:
    """Ray Data stage 2: ``__init__`` loads the black box and opens the store, ``__call__`` forwards
    and writes the batch's one decoded class."""

    def __init__(self, config_json: str):
        self.failed: Exception | None = None
        try:
            self.config = Config.model_validate_json(config_json)
            self.backbone = load_backbone(self.config)
            self.store = FeatureStore.open(self.config.storage.features, storage_options=self.config.storage.storage_options or None)
        except Exception as err:  # noqa: BLE001 - reported by __call__: Ray Data would report a dead actor
            self.failed = err

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        k = int(batch["k"][0])
        try:
            if self.failed is not None:
                raise self.failed
            if bool(batch["resumed"][0]):  # complete and intact: nothing to do
                done = ClassExtraction(k, 0, 0, 0, 0.0, resumed=True)
            else:
                decoded = DecodedClass(
                    k=k,
                    images=torch.from_numpy(np.array(batch["images"][0])),  # a writable copy of the object store's view
                    entries=[tuple(e) for e in json.loads(str(batch["entries"][0]))],
                    seconds=float(batch["decode_seconds"][0]),
                    damage=str(batch["damage"][0]) or None,
                )
                die_before_writing_for_test(self.store.fs, self.store.marker_path(k), lambda: self._written(k))
                (done,) = forward_group(self.config, self.backbone, self.store, [decoded])
            row, error = done.to_dict(), b""
        except Exception as err:  # noqa: BLE001 - sent back whole (Ray Data's UserCodeException loses its type)
            row, error = {**dict.fromkeys(SUMMARY, 0), "k": k}, _as_data(err)
        return {**{name: np.array([row[name]]) for name in SUMMARY}, "worker": np.array([os.getpid()]),
                "decoder": batch["decoder"], "error": np.array([error], dtype=object)}

    def _written(self, k: int) -> list[str]:
        """The store's objects of class k now (what a fault-injection test records; lists the store)."""
        root = self.store.root
        return sorted(p.removeprefix(root).lstrip("/") for p in self.store.fs.find(root) if class_stem(k) in p)


WORKER_NOTE = "in the extraction worker:\n"


def _as_data(err: Exception) -> bytes:
    """``err`` pickled, with the worker's traceback as a note (pickling drops tracebacks)."""
    if not any(note.startswith(WORKER_NOTE) for note in getattr(err, "__notes__", [])):
        err.add_note(WORKER_NOTE + "".join(traceback.format_exception(err)))
    try:
        return pickle.dumps(err)
    except Exception:  # noqa: BLE001 - an exception that does not pickle: keep what it said
        return pickle.dumps(RuntimeError(f"{type(err).__name__}: {err}"))


def extract_on_ray(config: Config, classes: list[int], on_class: Callable[[dict], None] | None = None) -> list[dict]:
    """Extract ``classes``; returns one small dict per class (``worker`` and ``decoder``: the pids of
    the actor that forwarded it and of the process that decoded it; classes already complete come
    back ``resumed`` without any work)."""
    compute = config.compute
    out: list[dict] = []
    todo = list(classes)  # complete classes too: the decode stage checks them where they are read
    if todo:
        config_json = config.model_dump_json()
        initial, largest = extract_pool_bounds(ray.cluster_resources(), cluster_most(), compute.extract_gpus, len(todo),
                                               compute.max_extract_workers)
        ds = ray.data.from_items([{"k": k} for k in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(_decode, fn_kwargs={"config_json": config_json}, batch_size=1, num_cpus=1)
        ds = ds.map_batches(
            FeatureExtractor,
            fn_constructor_kwargs={"config_json": config_json},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=largest, initial_size=initial),
            num_gpus=compute.extract_gpus,
            num_cpus=1,
        )
        for row in ds.iter_rows():
            row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            error = row.pop("error")
            if error:
                raise pickle.loads(error)
            out.append(row)
            if on_class is not None:
                on_class(row)
    return sorted(out, key=lambda r: r["k"])
