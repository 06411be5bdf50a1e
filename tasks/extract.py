"""Feature extraction on Ray: a Ray Data pipeline over the classes still to extract.

    classes ──▶ decode (CPU tasks) ──▶ FeatureExtractor (an autoscaling pool of actors) ──▶ summaries

- **decode**, one Ray task per class (``num_cpus=1``): reads the class's rows of the dataset index
  (never a listing), reads and decodes its images on a few threads, resizes and crops them, and
  hands the class on as one (n, 3, S, S) uint8 tensor (a quarter of float32's bytes).
- **FeatureExtractor**, an actor holding the black box (``num_gpus=compute.extract_gpus``):
  normalizes, forwards, and writes the whole class to the feature store itself (one writer per
  class, chunk-aligned), returning a few numbers.

Ray Data streams one into the other, so every CPU of the cluster decodes while the GPUs forward.
A class that fails (its images cannot be read, its store objects not written) fails alone: its
error travels down the pipeline as a value, the other classes are finished, and the step then
raises :class:`ClassesFailed` naming the failed ones.
The actor pool starts with what the cluster holds and grows to what it can hold
(:func:`extract_pool_bounds`). With
``extract_gpus: 0`` both stages ask for the same resources and Ray Data fuses them: each CPU actor
then decodes and forwards its own classes, one core each, which is what a CPU-only cluster wants.
"""

from __future__ import annotations

import math
import os
import pickle
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import ray
import torch

from protonmf.data.extract import ClassExtraction, DecodedClass
from protonmf import pipeline
from protonmf.pipeline import Prepared, Run, class_state
from protonmf.storage import concurrently

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


@dataclass(frozen=True)
class DecodedBundle:
    """Stage 1's output beside the images: each class of a bundle decoded (its images in the
    bundle's ``images`` column, in class order), or complete and intact (``resumed``)."""

    classes: list[DecodedClass]  # images empty: they travel in the images column
    counts: list[int]  # images of each class in the images column
    resumed: list[bool]
    decoder: int  # pid of the process that decoded the bundle
    error: Exception | None = None  # why the bundle could not be decoded (its classes fail, the others go on)


def _one(value: object) -> np.ndarray:
    """A one-row object column holding ``value`` as it is (Ray pickles it)."""
    column = np.empty(1, dtype=object)
    column[0] = value
    return column


def _decode(batch: dict[str, np.ndarray], run: Run) -> dict[str, np.ndarray]:
    """Ray Data stage 1 (CPU): check the classes of the batch's one bundle that the plan found
    complete (``storage.verify``: read back against their checksums; an intact class is passed on
    as resumed, undecoded) and decode the others; the bundle goes on as one row, its images concatenated."""
    classes, marked = batch["classes"][0].tolist(), batch["marked"][0].tolist()
    S = run.config.data.preprocess.crop
    none = torch.zeros(0, 3, S, S, dtype=torch.uint8)
    try:
        states = dict(zip(classes, concurrently(lambda km: class_state(run, *km), list(zip(classes, marked)))))
        todo = [k for k in classes if states[k][0]]
        decoded = {d.k: d for d in pipeline.decode_group(run, todo)} if todo else {}  # one read of the index for all
    except Exception as err:  # noqa: BLE001 - these classes fail; the pipeline goes on with the others
        failed = DecodedBundle([DecodedClass(k, none, []) for k in classes], [0] * len(classes), [False] * len(classes),
                               os.getpid(), error=_with_worker_note(err))
        return {"images": none.numpy()[None], "bundle": _one(failed)}
    parts = [decoded.get(k, DecodedClass(k, none, [])) for k in classes]
    bundle = DecodedBundle(
        classes=[replace(d, images=none, damage=states[d.k][1]) for d in parts],
        counts=[len(d.images) for d in parts],
        resumed=[not states[k][0] for k in classes],
        decoder=os.getpid(),
    )
    return {"images": torch.cat([d.images for d in parts]).numpy()[None],  # (1, N, 3, S, S) uint8
            "bundle": _one(bundle)}


class FeatureExtractor:
    """Ray Data stage 2: ``__init__`` loads the black box and opens the store, ``__call__`` forwards
    and writes each class of the batch's one bundle (one row per class comes out)."""

    def __init__(self, run: Run):
        self.failed: Exception | None = None
        self.run = run
        try:
            _ = run.backbone, run.store  # loaded once per actor
        except Exception as err:  # noqa: BLE001 - reported by __call__: Ray Data would report a dead actor
            self.failed = err

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bundle: DecodedBundle = batch["bundle"][0]
        classes = [d.k for d in bundle.classes]
        try:
            if self.failed is not None:
                raise self.failed
            if bundle.error is not None:
                raise bundle.error
            images = torch.from_numpy(np.array(batch["images"][0]))  # a writable copy of the object store's view
            decoded = [replace(d, images=x) for d, x, resumed in zip(bundle.classes, images.split(bundle.counts), bundle.resumed)
                       if not resumed]
            done = {d.k: d for d in pipeline.forward_group(self.run, decoded)}
            rows = [done.get(k, ClassExtraction(k, 0, 0, 0, 0.0, resumed=True)) for k in classes]
            rows = [replace(r, worker=os.getpid(), decoder=bundle.decoder) for r in rows]
            errors: list[Exception | None] = [None] * len(rows)
        except Exception as err:  # noqa: BLE001 - sent back whole (Ray Data's UserCodeException loses its type)
            rows = [ClassExtraction(k, 0, 0, 0, 0.0, resumed=False) for k in classes]
            errors = [_with_worker_note(err)] * len(classes)  # a class of the bundle may be done: a retry finds its marker
        return {"extraction": _column(rows), "error": _column(errors)}


def _column(values: list) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def class_bundles(sizes: Sequence[int], classes: Sequence[int], images: int, workers: int) -> list[list[int]]:
    """``classes`` in consecutive bundles of at least ``images`` images each (a class with more is
    a bundle of its own), and at most 1/4 of a worker's share of the classes, so that each of
    ``workers`` actors gets several bundles. ``sizes[k]``: the images of class k.

    The unit of a Ray Data block: each block costs a task, a read of the store's metadata and of
    the dataset index, so classes of a few images go together; ImageNet's (~1,300 images) go one
    by one. Each class is still forwarded and written on its own.

    >>> class_bundles([3] * 10, range(10), images=6, workers=1)
    [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    >>> class_bundles([1300, 3, 3, 1300] + [3] * 8, range(12), images=256, workers=1)
    [[0], [1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11]]
    """
    classes = list(classes)
    most = max(1, math.ceil(len(classes) / (4 * max(1, workers))))
    bundles: list[list[int]] = []
    held = 0
    for k in classes:
        if not bundles or held >= images or len(bundles[-1]) >= most:
            bundles.append([])
            held = 0
        bundles[-1].append(k)
        held += sizes[k]
    return bundles


WORKER_NOTE = "in the extraction worker:\n"


class ClassesFailed(ExceptionGroup):
    """Some classes of an extraction failed (each error once, with the classes it failed); the
    other classes are complete in the store. Retryable if each error is (:func:`tasks.runtime.is_retryable`)."""

    @classmethod
    def of(cls, failed: Mapping[int, Exception], class_names: Sequence[str], total: int) -> ClassesFailed:
        by_error: dict[int, tuple[Exception, list[int]]] = {}
        for k, err in sorted(failed.items()):
            by_error.setdefault(id(err), (err, []))[1].append(k)
        for err, ks in by_error.values():
            err.add_note(f"the error of class(es) {_named(ks, class_names)}")
        return cls(f"extraction failed for {len(failed)} of {total} classes: {_named(sorted(failed), class_names)}; "
                   "the other classes are in the store, and a retry or a rerun extracts only these",
                   [err for err, _ in by_error.values()])


def _named(classes: Sequence[int], names: Sequence[str], most: int = 20) -> str:
    shown = ", ".join(f"{k} ({names[k]!r})" for k in classes[:most])
    return shown + (f" and {len(classes) - most} more" if len(classes) > most else "")


def _with_worker_note(err: Exception) -> Exception:
    """``err`` with the worker's traceback as a note (pickling, on its way back, drops tracebacks)."""
    if not any(note.startswith(WORKER_NOTE) for note in getattr(err, "__notes__", [])):
        err.add_note(WORKER_NOTE + "".join(traceback.format_exception(err)))
    try:
        pickle.dumps(err)
    except Exception:  # noqa: BLE001 - an exception that does not pickle: keep what it said
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err


def extract_features(prepared: Prepared, classes: Sequence[int] | None = None,
                     on_class: Callable[[ClassExtraction], None] | None = None) -> list[ClassExtraction]:
    """Extract ``classes`` (default: all) of a prepared run; one :class:`ClassExtraction` per
    class, in class order (``worker`` and ``decoder``: the pids of the actor that forwarded it and
    of the process that decoded it; classes already complete come back ``resumed`` without any work).

    What to do is planned first, from the markers as they are now and the dataset index
    (:func:`~protonmf.pipeline.plan_extraction`: under the run's lease nobody else writes them,
    and a retry of the step starts from what the failed attempt finished): a class made from the
    images the listing shows is not touched (no decode task, no chunk read; with
    ``storage.verify`` it is read back and checked), the others are extracted. With nothing to
    extract no pipeline starts. A class that fails does not stop the others: once every other
    class is done, :class:`ClassesFailed` names the failed ones."""
    run = prepared.run
    compute = run.config.compute
    plan = pipeline.plan_extraction(run, list(range(len(prepared.class_names)) if classes is None else classes))
    out: list[ClassExtraction] = list(plan.current)
    for row in plan.current:
        if on_class is not None:
            on_class(row)
    todo = sorted(plan.extract + plan.check)
    if not todo:
        return sorted(out, key=lambda r: r.k)
    initial, largest = extract_pool_bounds(ray.cluster_resources(), cluster_most(), compute.extract_gpus, len(todo),
                                           compute.max_extract_workers)
    bundles = class_bundles(prepared.sizes, todo, compute.batch_size, largest)
    checked = set(plan.check)
    items = [{"classes": b, "marked": [k in checked for k in b]} for b in bundles]
    ds = ray.data.from_items(items, override_num_blocks=len(bundles))
    ds = ds.map_batches(_decode, fn_kwargs={"run": run}, batch_size=1, num_cpus=1)
    ds = ds.map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={"run": run},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=largest, initial_size=initial),
        num_gpus=compute.extract_gpus,
        num_cpus=1,
    )
    failed: dict[int, Exception] = {}
    for row in ds.iter_rows():
        if row["error"] is not None:
            failed[row["extraction"].k] = row["error"]
            continue
        out.append(row["extraction"])
        if on_class is not None:
            on_class(row["extraction"])
    if failed:
        raise ClassesFailed.of(failed, prepared.class_names, len(todo) + len(plan.current))
    return sorted(out, key=lambda r: r.k)
