"""The interface every image source offers: ``classes``, ``records``, ``load(record)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from protonmf.data.decode import READ_RETRY, ReadRetry
from protonmf.data.records import Record
from protonmf.storage import to_fs


class ImageSource:
    """What every source offers: ``classes``, ``records`` and ``load(record)``.

    Sources that list storage (ImageFolder, CUB, Parquet and WebDataset shards) can also be written
    to a dataset index (:mod:`protonmf.data.index`) and reopened from it without listing:
    :meth:`index_settings` is what loading needs besides the records, :meth:`from_index` rebuilds
    the source from those settings and some of the records.
    """

    classes: list[str]
    records: list[Record]
    #: names of the keypoints every record carries (``Record.keypoints``), or None: no keypoints
    keypoint_names: tuple[str, ...] | None = None
    #: how a failed read of an image's bytes is retried before it fails (:class:`~protonmf.data.decode.ReadRetry`)
    read_retry: ReadRetry = READ_RETRY

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.records)

    def records_of(self, label: int) -> list[Record]:
        """The records of one class, in record order (grouped once, then looked up)."""
        groups = self.__dict__.get("_by_label")
        if groups is None:
            groups = {}
            for record in self.records:
                groups.setdefault(record.label, []).append(record)
            self.__dict__["_by_label"] = groups
        return groups.get(label, [])

    def load(self, record: Record) -> tuple[Image.Image | None, str | None]:  # pragma: no cover
        raise NotImplementedError

    def index_settings(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`_open`: what loading needs besides the records."""
        raise ValueError(f"{type(self).__name__} holds its images in memory: it has no dataset index")

    def _open(self, **settings: Any) -> None:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def from_index(
        cls, settings: dict[str, Any], classes: Sequence[str], records: Sequence[Record],
        storage_options: dict[str, Any] | None = None,
    ) -> ImageSource:
        """The source as listed before, with only ``records``: nothing is listed or read here."""
        source = cls.__new__(cls)
        source._open(**settings, storage_options=storage_options)
        source.classes = list(classes)
        source.records = list(records)
        return source

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()}, {len(self.classes)} classes, {len(self.records)} images)"

    def _describe(self) -> str:
        return ""

    def _open_root(self, root: str, storage_options: dict[str, Any] | None) -> None:
        """``root``, ``storage_options``, ``fs``, ``path`` (root inside fs) and ``_local`` of a
        source that reads a folder of files (local or any fsspec URI)."""
        self.root = str(root).rstrip("/") or str(root)
        self.storage_options = dict(storage_options or {})
        self.fs, self.path, self._local = open_fs(self.root, self.storage_options)


def open_fs(root: str, storage_options: dict[str, Any] | None) -> tuple[Any, str, bool]:
    """(filesystem, path of root in it, whether it is local)."""
    fs, path = to_fs(root, storage_options)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return fs, path.rstrip("/") or path, "file" in protocols


def find_records(source: ImageSource, wanted: Sequence[dict[str, Any]]) -> list[Record]:
    """The records of ``wanted`` (``image_id`` and ``label`` of each), in that order; an image no
    longer in the data is named."""
    by_label: dict[int, dict[str, Record]] = {}
    out = []
    for w in wanted:
        index = by_label.setdefault(w["label"], {r.image_id: r for r in source.records_of(w["label"])})
        if w["image_id"] not in index:
            raise ValueError(f"data.train: image {w['image_id']!r} of the feature store is no longer in the data")
        out.append(index[w["image_id"]])
    return out
