"""Step 2, extract: the black box's features of whole classes into the run's feature store.

:func:`extract_features` does it in one process (decoding threads beside the forward pass); on
Ray the two halves run apart: :func:`decode_group` on CPUs, :func:`forward_group` where the
network is. :func:`class_state` says, before any work, whether a class must be extracted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protonmf.data.extract import ClassExtraction, DecodedClass, damaged_or_missing, decode_class, extract_classes, extract_decoded
from protonmf.devices import step_device
from protonmf.pipeline.run import Run
from protonmf.storage import concurrently

__all__ = ["DECODE_THREADS", "class_state", "decode_group", "extract_features", "forward_group"]

#: Reading threads of one decode task: object storage answers a GET in tens of milliseconds, so a
#: few reads in flight keep the task's one core decoding instead of waiting.
DECODE_THREADS = 4


def extract_features(run: Run, classes: Sequence[int], **kwargs: Any) -> list[ClassExtraction]:
    """Extract ``classes`` in this process (decoding threads beside the forward pass)."""
    c = run.config.compute
    kwargs.setdefault("device", step_device(c.extract_gpus, "compute.extract_gpus"))
    return extract_classes(run.backbone, run.source("train", labels=list(classes)), run.preprocess, run.store,
                           list(classes), batch_size=c.batch_size, precision=c.precision, channels_last=c.channels_last,
                           **kwargs)


def class_state(run: Run, k: int, marked: bool) -> tuple[bool, str | None]:
    """(extract class k?, what is wrong with its stored features if it is complete but damaged).

    ``marked``: whether prepare listed a completion marker for it; a class without one is missing,
    not looked up (a request per class); a marked one is read back against its checksums."""
    if not marked:
        return True, None
    todo, _, damage = damaged_or_missing(run.store, k)
    return todo, damage


def decode_group(run: Run, classes: Sequence[int]) -> list[DecodedClass]:
    """Read, decode and crop the images of ``classes`` (the CPU half of extraction), reading only
    their rows of the dataset index.

    A few classes (ImageNet's, of ~1,300 images) are decoded one after another, each on
    ``DECODE_THREADS`` threads; many (small classes go to a task together) are decoded
    ``IN_FLIGHT`` classes at once, each on the thread that reads it: a thread pool per class of
    three images would cost more than its reads.
    """
    classes = list(classes)
    source = run.source("train", labels=classes)
    pre, batch = run.preprocess, run.config.compute.batch_size
    if len(classes) < DECODE_THREADS:
        return [decode_class(source, pre, k, workers=DECODE_THREADS, batch_size=batch) for k in classes]
    return concurrently(lambda k: decode_class(source, pre, k, workers=0, batch_size=batch), classes)


def forward_group(run: Run, decoded: list[DecodedClass]) -> list[ClassExtraction]:
    """Forward decoded classes and write each to the store (the GPU half of extraction; the
    writes of earlier classes overlap the forward pass of later ones, see :func:`~protonmf.data.extract.extract_decoded`)."""
    c = run.config.compute
    return extract_decoded(run.backbone, decoded, run.preprocess, run.store, batch_size=c.batch_size,
                           device=step_device(c.extract_gpus, "compute.extract_gpus"),
                           precision=c.precision, channels_last=c.channels_last)
