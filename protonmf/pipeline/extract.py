"""Step 2, extract: the black box's features of whole classes into the run's feature store.

:func:`extract_features` does it in one process (decoding threads beside the forward pass); on
Ray the two halves run apart: :func:`decode_group` on CPUs, :func:`forward_group` where the
network is. :func:`class_state` says, before any work, whether a class must be extracted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from protonmf.data.extract import ClassExtraction, DecodedClass, damaged_or_missing, decode_class, extract_classes, extract_decoded
from protonmf.devices import step_device
from protonmf.pipeline.run import Run
from protonmf.storage import concurrently

__all__ = ["ExtractionPlan", "class_state", "decode_group", "extract_features", "forward_group",
           "plan_extraction"]

@dataclass(frozen=True)
class ExtractionPlan:
    """What an extraction does, decided from the listing and the markers alone (no chunk read).

    extract: the classes not in the store, or made from other images than the listing shows now.
    check: complete classes made from these very images, read back against their checksums
        before they are trusted (``storage.verify``); extracted again if damaged.
    current: the complete classes trusted as they are, as their results (``resumed``).
    changed: the classes of ``extract`` that were complete, made from other images.
    """

    extract: list[int]
    check: list[int]
    current: list[ClassExtraction]
    changed: list[int]


def plan_extraction(run: Run, classes: Sequence[int]) -> ExtractionPlan:
    """The plan for ``classes``: each class's marker (one LIST of them, then the markers) against
    what the dataset index says the class is made from. The markers of the changed classes are
    removed here, before anything is written: until extracted again they are not complete."""
    want, stored = run.images_sha256, run.store.made_from()
    current = [k for k in classes if k in stored and stored[k]["images_sha256"] == want[k]]
    changed = [k for k in classes if k in stored and stored[k]["images_sha256"] != want[k]]
    run.store.retract(changed)
    verify = run.config.storage.verify
    up_to_date = set(current)
    return ExtractionPlan(
        extract=[k for k in classes if k not in up_to_date],
        check=current if verify else [],
        current=[] if verify else [ClassExtraction(k, stored[k]["n_images"], stored[k]["n_skipped"], 0, 0.0, resumed=True)
                                   for k in current],
        changed=changed,
    )


def extract_features(run: Run, classes: Sequence[int], **kwargs: Any) -> list[ClassExtraction]:
    """Extract ``classes`` in this process (decoding threads beside the forward pass), as
    :func:`plan_extraction` plans it; one result per class, in class order."""
    c = run.config.compute
    kwargs.setdefault("device", step_device(c.extract_gpus, "compute.extract_gpus"))
    plan = plan_extraction(run, classes)
    todo = sorted(plan.extract + plan.check)
    done = extract_classes(run.backbone, run.source("train", labels=todo), run.preprocess, run.store, todo,
                           batch_size=c.batch_size, precision=c.precision, channels_last=c.channels_last,
                           max_skipped_fraction=run.config.data.max_skipped_fraction, **kwargs)
    return sorted(done + plan.current, key=lambda r: r.k)


def class_state(run: Run, k: int, marked: bool) -> tuple[bool, str | None]:
    """(extract class k?, what is wrong with its stored features if it is complete but damaged).

    ``marked``: whether the plan found it complete (:attr:`ExtractionPlan.check`); a class
    without a marker is extracted, not looked up (a request per class); a marked one is read
    back against its checksums."""
    if not marked:
        return True, None
    todo, _, damage = damaged_or_missing(run.store, k)
    return todo, damage


def decode_group(run: Run, classes: Sequence[int]) -> list[DecodedClass]:
    """Read, decode and crop the images of ``classes`` (the CPU half of extraction), reading only
    their rows of the dataset index.

    A few classes (ImageNet's, of ~1,300 images) are decoded one after another, each on
    ``compute.read_threads`` threads; many (small classes go to a task together) are decoded
    ``IN_FLIGHT`` classes at once, each on the thread that reads it: a thread pool per class of
    three images would cost more than its reads.
    """
    classes = list(classes)
    source = run.source("train", labels=classes)
    pre, batch = run.preprocess, run.config.compute.batch_size
    threads = run.config.compute.read_threads
    if len(classes) < threads:
        return [decode_class(source, pre, k, workers=threads, batch_size=batch) for k in classes]
    return concurrently(lambda k: decode_class(source, pre, k, workers=0, batch_size=batch), classes)


def forward_group(run: Run, decoded: list[DecodedClass]) -> list[ClassExtraction]:
    """Forward decoded classes and write each to the store (the GPU half of extraction; the
    writes of earlier classes overlap the forward pass of later ones, see :func:`~protonmf.data.extract.extract_decoded`)."""
    c = run.config.compute
    return extract_decoded(run.backbone, decoded, run.preprocess, run.store, batch_size=c.batch_size,
                           device=step_device(c.extract_gpus, "compute.extract_gpus"),
                           precision=c.precision, channels_last=c.channels_last,
                           max_skipped_fraction=run.config.data.max_skipped_fraction)
