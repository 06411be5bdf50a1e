"""The interface every image source offers: ``classes``, ``records``, ``load(record)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from protonmf.data.records import Record


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
