"""What a source lists (:class:`Record`), what it could not read (:class:`Skipped`), and a batch of
preprocessed images with both (:class:`Batch`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

@dataclass(frozen=True)
class Record:
    """One image of a source.

    Attributes
    ----------
    image_id : str, stable and unique within the source, e.g. ``"<class>/<filename>"``.
    uri : str, where the image lives (an fsspec URI or local path; for in-memory sources a
        descriptive ``sklearn://`` or ``synthetic://`` name).
    label : int, index into the source's ``classes``.
    bbox : (x, y, width, height) in pixels or None; :class:`CUBSource` crops to it when loading.
    index : int or None, row in an in-memory array (digits, synthetic) or in a Parquet shard.
    offset, nbytes : int or None, the image's bytes in a tar shard (WebDataset): ``nbytes`` bytes
        from byte ``offset``.
    keypoints : ((x, y, visible), ...) or None, one per part of the source's ``keypoint_names``, in
        pixels of the image :meth:`ImageSource.load` returns (CUB: the cropped image).
    size : (width, height) of that image when the source knows it without decoding (for keypoints).
    version : str or None, what the listing says of the bytes (an object's ETag, a file's size and
        mtime, a shard's version): a changed image has another, so a rerun sees it changed
        (:func:`images_sha256`) without reading it.
    """

    image_id: str
    uri: str
    label: int
    bbox: tuple[float, float, float, float] | None = None
    index: int | None = None
    keypoints: tuple[tuple[float, float, bool], ...] | None = None
    size: tuple[int, int] | None = None
    offset: int | None = None
    nbytes: int | None = None
    version: str | None = None


def images_sha256(records: Sequence[Record]) -> str:
    """What a class is made from, as one sha256: its records' ids, locations and versions, in order.

    The feature store's marker of a class keeps it (:mod:`protonmf.data.store`), the dataset index
    holds every class's (:mod:`protonmf.data.index`): a rerun compares the two and extracts again
    only the classes whose images were added, removed or changed, reading nothing but the listing
    and the markers."""
    parts = [[r.image_id, r.uri, r.version, r.index, r.offset, r.nbytes, r.bbox] for r in records]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Skipped:
    """A file that could not be used, and why (e.g. ``"truncated image: ..."``)."""

    image_id: str
    uri: str
    reason: str


@dataclass
class Batch:
    """Preprocessed images with their labels and ids.

    Attributes
    ----------
    images : (B, 3, S, S) float32.
    labels : (B,) int64.
    image_ids, uris : B strings each, in the order of ``images``.
    skipped : files skipped since the previous batch (the last batch also carries those skipped
        after its last image). Only when no file at all could be used is a batch empty (B = 0).
    """

    images: Tensor
    labels: Tensor
    image_ids: list[str]
    uris: list[str]
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_ids)
