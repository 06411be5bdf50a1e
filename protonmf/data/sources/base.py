"""The interface every image source offers: ``classes``, ``records``, ``load(record)``."""

from __future__ import annotations


from PIL import Image

from protonmf.data.records import Record

class ImageSource:
    """What every source offers: ``classes``, ``records`` and ``load(record)``."""

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()}, {len(self.classes)} classes, {len(self.records)} images)"

    def _describe(self) -> str:
        return ""
