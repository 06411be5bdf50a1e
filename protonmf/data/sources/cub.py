"""CUB-200-2011 in its archive layout; loads crop to the bird's bounding box."""

from __future__ import annotations

from typing import Any

from PIL import Image

from protonmf.data.decode import load_image, describe_error
from protonmf.data.records import Record
from protonmf.data.sources.base import ImageSource

_CUB_FILES = ("images.txt", "image_class_labels.txt", "classes.txt", "train_test_split.txt", "bounding_boxes.txt")
_SPLITS_TRAIN_TEST = ("train", "test", "all")


def _crop_box(bbox: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) → PIL crop box (left, upper, right, lower), rounded as ``Image.crop`` rounds
    and clipped to the image; None if nothing of the box is inside."""
    x, y, w, h = bbox
    W, H = size
    left, upper = max(0, round(x)), max(0, round(y))
    right, lower = min(W, round(x + w)), min(H, round(y + h))
    if right <= left or lower <= upper:
        return None
    return left, upper, right, lower


def _in_box(points: list[tuple[float, float, bool]], bbox: tuple[float, float, float, float]) -> dict:
    """Keypoints in the pixels of the image cropped to ``bbox`` (as :func:`_crop_box` crops; CUB's
    boxes lie inside their images) and that image's size, as ``Record`` fields."""
    x, y, w, h = bbox
    left, upper = max(0, round(x)), max(0, round(y))
    width, height = round(x + w) - left, round(y + h) - upper
    moved = tuple(
        (px - left, py - upper, bool(vis and 0 <= px - left < width and 0 <= py - upper < height)) for px, py, vis in points
    )
    return {"keypoints": moved, "size": (width, height)}


class CUBSource(ImageSource):
    """CUB-200-2011 in the layout of the official archive (``CUB_200_2011/``).

    Reads ``images.txt`` (id path), ``image_class_labels.txt`` (id class_id, 1-based),
    ``classes.txt`` (class_id name), ``train_test_split.txt`` (id is_train) and
    ``bounding_boxes.txt`` (id x y width height); images are at ``images/<path>``. If
    ``parts/parts.txt`` (part_id name) and ``parts/part_locs.txt`` (id part_id x y visible) are
    there (and ``crop=True``), every record carries the 15 keypoints in the cropped image's pixels
    (``Record.keypoints``; a point outside the box counts as not visible) and ``Record.size``, the
    box's size; ``keypoint_names`` are the part names.

    Labels are ``class_id - 1``; ``classes`` are the names of ``classes.txt`` (e.g.
    ``"001.Black_footed_Albatross"``) in class-id order. Records are in image-id order, with
    ``image_id`` the image's path from ``images.txt`` and ``bbox`` its box. With ``crop=True``
    (default) :meth:`load` crops each image to its box before any preprocessing, as ProtoPNet and
    ProtoNMF do. The box is rounded to whole pixels as ``PIL.Image.crop`` rounds and clipped to
    the image.

    Parameters
    ----------
    root : str, the folder holding the text files and ``images/`` (local path or URI).
    split : "train", "test" or "all".
    crop : bool, crop to the bounding box when loading.
    storage_options : dict or None, passed to fsspec.
    """

    def __init__(
        self,
        root: str,
        *,
        split: str,
        crop: bool = True,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if split not in _SPLITS_TRAIN_TEST:
            raise ValueError(f"CUB split must be one of {', '.join(_SPLITS_TRAIN_TEST)}, got {split!r}")
        self._open(root, split, crop, storage_options)

        needed = _CUB_FILES if self.crop else _CUB_FILES[:4]
        tables = {name: self._read_table(name, required=name in needed) for name in _CUB_FILES}

        paths = {int(k): v for k, v in self._rows(tables["images.txt"], "images.txt", 2)}
        if not paths:
            raise ValueError(f"no images found under {self.root}: images.txt lists none")
        class_rows = [(int(k), v) for k, v in self._rows(tables["classes.txt"], "classes.txt", 2)]
        ids = [k for k, _ in class_rows]
        if sorted(ids) != list(range(1, len(ids) + 1)):
            raise ValueError(f"{self.root}/classes.txt: class ids must be 1..K, got {sorted(ids)[:10]}...")
        self.classes = [name for _, name in sorted(class_rows)]
        labels = {int(k): int(v) - 1 for k, v in self._rows(tables["image_class_labels.txt"], "image_class_labels.txt", 2)}
        is_train = {int(k): int(v) for k, v in self._rows(tables["train_test_split.txt"], "train_test_split.txt", 2)}
        boxes = self._boxes(tables["bounding_boxes.txt"])
        self._check_every_image_listed(paths, labels, is_train, boxes)

        keypoints = self._keypoints(paths) if self.crop else {}
        keep = {"train": (1,), "test": (0,), "all": (0, 1)}[split]
        self.records = [
            Record(
                image_id=paths[k],
                uri=self._uri(f"images/{paths[k]}"),
                label=labels[k],
                bbox=boxes.get(k),
                **(_in_box(keypoints[k], boxes[k]) if keypoints else {}),
            )
            for k in sorted(paths)
            if is_train[k] in keep
        ]
        if not self.records:
            raise ValueError(f"no images found under {self.root} for split {split!r}")

    def _keypoints(self, paths: dict[int, str]) -> dict[int, list[tuple[float, float, bool]]]:
        """parts/part_locs.txt: image id → one (x, y, visible) per part of parts/parts.txt; {} without parts/."""
        names_text = self._read_table("parts/parts.txt", required=False)
        locs_text = self._read_table("parts/part_locs.txt", required=False)
        if names_text is None or locs_text is None:
            return {}
        names = sorted((int(k), v) for k, v in self._rows(names_text, "parts/parts.txt", 2))
        if [k for k, _ in names] != list(range(1, len(names) + 1)):
            raise ValueError(f"{self.root}/parts/parts.txt: part ids must be 1..P, got {[k for k, _ in names][:20]}")
        self.keypoint_names = tuple(v for _, v in names)
        out = {k: [(0.0, 0.0, False)] * len(names) for k in paths}
        for lineno, line in enumerate(locs_text.splitlines(), 1):
            vals = line.split()
            if not vals:
                continue
            try:
                k, part, x, y, visible = int(vals[0]), int(vals[1]), float(vals[2]), float(vals[3]), int(vals[4])
            except (ValueError, IndexError):
                raise ValueError(f"{self.root}/parts/part_locs.txt line {lineno}: expected id part_id x y visible, got {line.strip()!r}") from None
            if not 1 <= part <= len(names):
                raise ValueError(f"{self.root}/parts/part_locs.txt line {lineno}: part id {part} not in parts/parts.txt")
            if k in out:
                out[k][part - 1] = (x, y, visible == 1)
        return out

    def _open(self, root: str, split: str, crop: bool, storage_options: dict[str, Any] | None = None) -> None:
        self._open_root(root, storage_options)
        self.split = split
        self.crop = bool(crop)

    def index_settings(self) -> dict[str, Any]:
        return {"root": self.root, "split": self.split, "crop": self.crop}

    def _boxes(self, table: str | None) -> dict[int, tuple[float, float, float, float]]:
        """bounding_boxes.txt: image id → (x, y, width, height)."""
        boxes: dict[int, tuple[float, float, float, float]] = {}
        if table is not None:
            for k, rest in self._rows(table, "bounding_boxes.txt", 2):
                vals = rest.split()
                if len(vals) != 4:
                    raise ValueError(f"{self.root}/bounding_boxes.txt: image {k}: expected x y width height, got {rest!r}")
                boxes[int(k)] = tuple(float(v) for v in vals)  # type: ignore[assignment]
        return boxes

    def _check_every_image_listed(self, paths: dict, labels: dict, is_train: dict, boxes: dict) -> None:
        """Every image of images.txt has a label, a split (and a box when cropping); labels are classes."""
        for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)) + (
            (("bounding_boxes.txt", boxes),) if self.crop else ()
        ):
            lacking = sorted(set(paths) - set(table))
            if lacking:
                raise ValueError(f"{self.root}/{name} has no entry for image id(s) {lacking[:10]}")
        bad = sorted(k for k, v in labels.items() if k in paths and not 0 <= v < len(self.classes))
        if bad:
            raise ValueError(f"{self.root}/image_class_labels.txt: image id(s) {bad[:10]} have a class id not in classes.txt")

    def _read_table(self, name: str, required: bool) -> str | None:
        path = f"{self.path}/{name}"
        try:
            return self.fs.cat_file(path).decode("utf-8")
        except FileNotFoundError:
            if required:
                raise ValueError(
                    f"{self.root} is not a CUB-200-2011 folder: {name} is missing "
                    f"(expected {', '.join(_CUB_FILES)} and images/)"
                ) from None
            return None
        except Exception as err:
            raise ValueError(f"cannot read {self.root}/{name}: {describe_error(err)}") from err

    def _rows(self, text: str, name: str, n: int) -> list[tuple[str, str]]:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=n - 1)
            if len(parts) != n or not parts[0].isdigit():
                raise ValueError(f"{self.root}/{name} line {lineno}: cannot parse {line!r}")
            rows.append((parts[0], parts[1]))
        return rows

    def _uri(self, rel: str) -> str:
        full = f"{self.path}/{rel}"
        return full if self._local else self.fs.unstrip_protocol(full)

    def load(self, record: Record) -> tuple[Image.Image | None, str | None]:
        img, reason = load_image(record.uri, self.fs, self.read_retry)
        if img is None or not self.crop or record.bbox is None:
            return img, reason
        box = _crop_box(record.bbox, img.size)
        if box is None:
            return None, f"bounding box outside the image: {record.uri}: box {record.bbox}, image {img.size}"
        return img.crop(box), None

    def _describe(self) -> str:
        return f"{self.root!r}, split={self.split!r}"


