"""Batching
    :func:`iter_batches` decodes and preprocesses with a small thread pool (decoding is I/O and
    C code, which release the GIL) and yields :class:`Batch` objects; each carries the files
    skipped while it was filled (:class:`Skipped`: image id, URI, reason), so a caller can record
    every skipped file.
"""
from __future__ import annotations

import os
import warnings
from collections import deque
from typing import Any
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageFile
from torch import Tensor

from protonmf.data.decode import ImageReadError, describe_error
from protonmf.data.records import Batch, Record, Skipped
from protonmf.data.sources.base import ImageSource

def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _load_one(source: ImageSource, preprocess: Callable[[Image.Image], Tensor], record: Record) -> tuple[Tensor | None, str | None]:
    try:
        img, reason = source.load(record)
    except (ImageReadError, PermissionError):
        raise  # the bytes could not be read: the class fails, nothing is dropped
    except Exception as err:  # any other error of a source's load is the image's: skipped and recorded
        return None, f"load failed: {record.uri}: {describe_error(err)}"
    if img is None:
        return None, reason or f"load failed: {record.uri}"
    try:
        return preprocess(img), None
    except Exception as err:
        return None, f"preprocess failed: {record.uri}: {describe_error(err)}"


def iter_batches(
    source: ImageSource,
    preprocess: Callable[[Image.Image], Tensor],
    batch_size: int,
    *,
    workers: int | None = None,
    records: Sequence[Record] | None = None,
    by_records: bool = False,
) -> Iterator[Batch]:
    """Decode, preprocess and batch the images of ``source``, in record order.

    Parameters
    ----------
    source : an :class:`ImageSource`.
    preprocess : PIL image → (3, S, S) tensor, e.g. :class:`Preprocess`.
    batch_size : int >= 1; every batch but the last has exactly this many images.
    workers : threads that read, decode and preprocess (default min(8, CPUs)); 0 does all in
        the calling thread. At most ``4 × workers`` images are in flight.
    records : the records to go through (default ``source.records``), e.g. a shard of them.
    by_records : cut a batch after every ``batch_size`` *records* instead of every ``batch_size``
        usable images: a skipped file leaves its batch one image short (a batch can be empty, with
        only skipped files), and the batches of ``records[i:]`` for i a multiple of ``batch_size``
        are those of the whole list from there on (so shards of a list are batched as the whole is).

    Yields
    ------
    Batch. Skipped files are not in ``images`` but in ``skipped`` (with their reason); together
    the batches' ``image_ids`` and ``skipped`` cover every record once. Iteration never stops
    because of a bad file.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    workers = _default_workers() if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        warnings.warn(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code): truncated images "
            "will load partly grey instead of being skipped",
            RuntimeWarning,
            stacklevel=2,
        )
    todo = list(source.records if records is None else records)
    return _batches(source, preprocess, int(batch_size), workers, todo, by_records)


def load_images(
    source: ImageSource, preprocess: Callable[[Image.Image], Tensor], records: Sequence[Record], *, batch_size: int = 64,
    workers: int | None = None,
) -> tuple[Tensor, list[Record]]:
    """The given records' images as one (n, 3, S, S) tensor, in record order, and the records used
    (unreadable files are left out)."""
    by_id = {r.image_id: r for r in records}
    images, used = [], []
    for batch in iter_batches(source, preprocess, batch_size, workers=workers, records=records):
        if len(batch):
            images.append(batch.images)
            used += [by_id[i] for i in batch.image_ids]
    return (torch.cat(images) if images else torch.zeros(0)), used


def _batch(items: list[tuple[Record, Tensor]], skipped: list[Skipped], crop: Any) -> Batch:
    if items:
        images = torch.stack([x for _, x in items])
    else:
        images = torch.empty((0, 3, crop, crop) if isinstance(crop, int) else (0, 3, 0, 0), dtype=torch.float32)
    return Batch(
        images=images,
        labels=torch.tensor([r.label for r, _ in items], dtype=torch.int64),
        image_ids=[r.image_id for r, _ in items],
        uris=[r.uri for r, _ in items],
        skipped=skipped,
    )


def _batches(source, preprocess, batch_size: int, workers: int, todo: list[Record], by_records: bool = False) -> Iterator[Batch]:
    crop = getattr(preprocess, "crop", None)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="protonmf-decode") if workers else None
    window = 4 * workers if workers else 1
    pending: deque[tuple[Record, Future]] = deque()
    it = iter(todo)

    def submit_more() -> None:
        while len(pending) < window:
            rec = next(it, None)
            if rec is None:
                return
            if executor is None:
                fut: Future = Future()
                fut.set_result(_load_one(source, preprocess, rec))
            else:
                fut = executor.submit(_load_one, source, preprocess, rec)
            pending.append((rec, fut))

    held: Batch | None = None  # a full batch, yielded once the next image arrives (or at the end)
    items: list[tuple[Record, Tensor]] = []
    skipped: list[Skipped] = []
    try:
        submit_more()
        while pending:
            rec, fut = pending.popleft()
            submit_more()
            x, reason = fut.result()
            if by_records:
                if x is None:
                    skipped.append(Skipped(rec.image_id, rec.uri, reason or "unknown"))
                else:
                    items.append((rec, x))
                if len(items) + len(skipped) == batch_size:
                    yield _batch(items, skipped, crop)
                    items, skipped = [], []
                continue
            if x is None:
                s = Skipped(rec.image_id, rec.uri, reason or "unknown")
                (held.skipped if held is not None else skipped).append(s)
                continue
            if held is not None:
                yield held
                held = None
            items.append((rec, x))
            if len(items) == batch_size:
                held = _batch(items, skipped, crop)
                items, skipped = [], []
        if held is not None:
            yield held
        elif items or skipped:
            yield _batch(items, skipped, crop)
    finally:
        for _, fut in pending:
            fut.cancel()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
