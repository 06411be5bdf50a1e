"""Held-out images labelled by class name: a source's records mapped onto another class list.

A held-out folder lists its own classes (in its own sorted order); the model's logits are in the
training classes' order. Matching by name keeps every label right when the two lists differ (a
class missing from the held-out set, or one the model does not know).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from PIL import Image

from protonmf.data.records import Record
from protonmf.data.sources.base import ImageSource

UNKNOWN_CLASSES = ("error", "skip")


class RelabeledSource(ImageSource):
    """``inner``'s images with labels that index ``classes``, matched by class name.

    Attributes
    ----------
    classes : the given class list (e.g. the model's class names, in logit order).
    records : ``inner``'s records of known classes, in their order, relabelled.
    unknown_classes : {name: number of images} of the held-out classes not in ``classes`` whose
        images were left out (``unknown="skip"``).
    """

    def __init__(self, inner: ImageSource, classes: Sequence[str], unknown_classes: dict[str, int]):
        self.inner = inner
        self.classes = list(classes)
        index = {name: i for i, name in enumerate(self.classes)}
        self.records = [
            replace(r, label=index[inner.classes[r.label]]) for r in inner.records if inner.classes[r.label] in index
        ]
        self.unknown_classes = dict(unknown_classes)

    def load(self, record: Record) -> tuple[Image.Image | None, str | None]:
        return self.inner.load(record)

    def _describe(self) -> str:
        return f"{self.inner!r} labelled by name"


def relabel_by_name(source: ImageSource, classes: Sequence[str], *, unknown: str = "error", what: str = "data.val") -> ImageSource:
    """``source`` with labels indexing ``classes``, matched by class name.

    A class of ``source`` that has images but is not in ``classes`` is a ValueError naming it
    (``unknown="error"``) or its images are left out and counted in ``unknown_classes``
    (``unknown="skip"``). Classes of ``classes`` without held-out images are fine. When the names
    already agree label for label, ``source`` itself is returned.
    """
    if unknown not in UNKNOWN_CLASSES:
        raise ValueError(f"unknown must be one of {', '.join(UNKNOWN_CLASSES)}, got {unknown!r}")
    classes = list(classes)
    if list(source.classes) == classes:
        return source
    known = set(classes)
    counts: dict[str, int] = {}
    for r in source.records:
        name = source.classes[r.label]
        if name not in known:
            counts[name] = counts.get(name, 0) + 1
    if counts and unknown == "error":
        names = sorted(counts)
        more = f" (and {len(names) - 20} more)" if len(names) > 20 else ""
        raise ValueError(
            f"{what}: {len(names)} held-out class(es) are not classes of the model: {', '.join(names[:20])}{more}; "
            "set data.unknown_val_classes: skip to leave their images out"
        )
    return RelabeledSource(source, classes, counts)
