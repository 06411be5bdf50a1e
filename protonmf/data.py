"""Image sources: where the images come from, how they are decoded, and how they are batched.

Every source has the same interface, so the rest of the project treats them alike:

- ``source.classes``: the class names, in label (logit) order;
- ``source.records``: a list of :class:`Record` (``image_id``, ``uri``, ``label``, and for some
  sources a bounding box or an array index), in a deterministic order;
- ``source.load(record) -> (PIL RGB image | None, skip_reason | None)``: never raises.

Sources
    :class:`ImageFolderSource` (``root/<class>/<image>`` on any fsspec URI: a local path,
    ``file://``, ``s3://``, ``gs://``), :class:`CUBSource` (the CUB-200-2011 archive layout; loads
    crop to the bird's bounding box), :class:`DigitsSource` (scikit-learn's 8×8 digits, no
    download) and :class:`SyntheticSource` (:func:`protonmf.synthetic.make_synthetic_parts`, with
    part masks). :func:`make_source` builds one from a kind name and keyword arguments.

Decoding
    :func:`load_image` reads a file through fsspec and decodes it with PIL into an RGB image.
    Grey, CMYK, 16-bit, palette and other modes are converted to RGB; images with transparency
    (RGBA, LA, PA, palette or grey/RGB with a ``tRNS`` transparency key) are composited on a
    **white** background. EXIF orientation is *not* applied (as torchvision's ``ImageFolder``
    loader, which the classifiers we explain were trained with). Unreadable, missing, zero-byte,
    truncated and non-image files give ``(None, reason)``; PIL's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone (False), so a truncated file is skipped and
    reported rather than loaded half-grey.

Batching
    :func:`iter_batches` decodes and preprocesses with a small thread pool (decoding is I/O and
    C code, which release the GIL) and yields :class:`Batch` objects; each carries the files
    skipped while it was filled (:class:`Skipped`: image id, URI, reason), so a caller can record
    every skipped file.
"""

from __future__ import annotations

import inspect
import io
import os
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch import Tensor

from protonmf.storage import to_fs

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "SOURCE_KINDS",
    "Batch",
    "CUBSource",
    "DigitsSource",
    "ImageFolderSource",
    "ImageSource",
    "Preprocess",
    "Record",
    "Skipped",
    "SyntheticSource",
    "iter_batches",
    "load_image",
    "load_images",
    "make_source",
    "to_rgb",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: File name endings (compared in lower case) that :class:`ImageFolderSource` takes as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

#: The background that transparent pixels are composited on.
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


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
    index : int or None, row in an in-memory array (digits, synthetic).
    """

    image_id: str
    uri: str
    label: int
    bbox: tuple[float, float, float, float] | None = None
    index: int | None = None


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


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _describe(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as an 8-bit RGB image.

    - RGB: unchanged. Grey (L, 1), CMYK, YCbCr, LAB, HSV, palette without transparency: PIL's
      ``convert("RGB")``.
    - 16-bit grey (I;16*): scaled to 8 bits (value / 257). 32-bit integer grey (I): taken as
      8-bit if its maximum is <= 255, else as 16-bit. Float grey (F): clipped to [0, 255].
    - With transparency (RGBA, LA, PA, premultiplied RGBa/La, or P/L/RGB with a transparency
      key): alpha-composited on white (:data:`ALPHA_BACKGROUND`).
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        if mode == "F":
            a = np.clip(a, 0, 255)
        elif mode in _SIXTEEN_BIT_MODES or a.max(initial=0) > 255:
            a = np.clip(a, 0, 65535) / 257.0
        else:
            a = np.clip(a, 0, 255)
        return Image.fromarray(np.rint(a).astype(np.uint8)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, name: str = "<bytes>") -> tuple[Image.Image | None, str | None]:
    """Decode encoded image bytes into an RGB image; ``(None, reason)`` instead of raising."""
    if len(data) == 0:
        return None, f"empty file: 0 bytes: {name}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # full decode now: a truncated file fails here, not later
    except UnidentifiedImageError as err:
        return None, f"not an image: {name}: {_describe(err)}"
    except Image.DecompressionBombError as err:
        return None, f"image too large: {name}: {_describe(err)}"
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        if "truncated" in str(err).lower() or isinstance(err, EOFError):
            return None, f"truncated image: {name}: {_describe(err)}"
        return None, f"corrupt image: {name}: {_describe(err)}"
    except Exception as err:  # a decoder bug must not stop a run over a million files
        return None, f"corrupt image: {name}: {_describe(err)}"
    try:
        rgb = to_rgb(img)
        rgb.load()
    except Exception as err:
        return None, f"cannot convert image mode {img.mode} to RGB: {name}: {_describe(err)}"
    return rgb, None


def load_image(uri: str, fs: Any = None) -> tuple[Image.Image | None, str | None]:
    """Read and decode the image at ``uri``.

    Parameters
    ----------
    uri : str, a path in ``fs`` or a full URI (``s3://bucket/key``, ``file:///x``, a local path).
    fs : fsspec filesystem or None (then the one of ``uri``, with credentials from the
        environment).

    Returns
    -------
    (image, None) with an RGB PIL image (see :func:`to_rgb`), or (None, reason) where reason
    starts with ``"missing file"``, ``"read error"``, ``"empty file"``, ``"not an image"``,
    ``"truncated image"``, ``"corrupt image"`` or ``"image too large"``. Never raises.
    """
    try:
        if fs is None:
            fs, path = to_fs(uri)
        else:
            path = uri
        data = fs.cat_file(path)
    except FileNotFoundError as err:
        return None, f"missing file: {uri}: {_describe(err)}"
    except IsADirectoryError as err:
        return None, f"read error: {uri} is a directory: {_describe(err)}"
    except Exception as err:
        return None, f"read error: {uri}: {_describe(err)}"
    return decode_image(data, uri)


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize``, center-crop ``crop`` × ``crop``, scale to [0, 1] and
    normalize with ``mean``/``std`` (the standard ImageNet evaluation transform by default).

    Calling it on a PIL image gives a (3, crop, crop) float32 tensor. Non-RGB images are first
    converted with :func:`to_rgb`. Resizing is bilinear with antialiasing, done by PIL (as
    ``torchvision.transforms.v2.Resize`` does for PIL input).
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"Preprocess.{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"Preprocess.{name} must have 3 values (R, G, B), got {value!r}")
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"Preprocess.std must be positive, got {self.std!r}")

    def _build(self):
        from torchvision.transforms import InterpolationMode, v2

        return v2.Compose(
            [
                v2.Resize(self.resize, interpolation=InterpolationMode.BILINEAR, antialias=True),
                v2.CenterCrop(self.crop),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(self.mean), std=list(self.std)),
            ]
        )

    @property
    def transform(self):
        """The torchvision v2 pipeline (built once per instance)."""
        t = self.__dict__.get("_transform")
        if t is None:
            t = self._build()
            object.__setattr__(self, "_transform", t)  # a cache, not a field: not in eq/hash/repr
        return t

    def __call__(self, img: Image.Image) -> Tensor:
        if isinstance(img, Image.Image):
            img = to_rgb(img)
        out = self.transform(img)
        return out.as_subclass(Tensor) if isinstance(out, Tensor) else out

    def undo(self, images: Tensor) -> np.ndarray:
        """Normalized images (N, 3, H, W) back to displayable (N, H, W, 3) floats in [0, 1]."""
        mean = torch.tensor(self.mean)[:, None, None]
        std = torch.tensor(self.std)[:, None, None]
        return (images.detach().cpu().float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values (e.g. for a model manifest)."""
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std)}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_transform"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class ImageSource:
    """What every source offers: ``classes``, ``records`` and ``load(record)``."""

    classes: list[str]
    records: list[Record]

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


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _check_names(value: Any, what: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{what} must be a list of class names, got {value!r}")
    names = [str(v) for v in value]
    if not names:
        raise ValueError(f"{what} is empty")
    dupes = sorted(n for n, k in Counter(names).items() if k > 1)
    if dupes:
        raise ValueError(f"{what} has duplicate names: {', '.join(dupes)}")
    return names


class ImageFolderSource(ImageSource):
    """Images laid out as ``root/<class>/<image>`` (ImageNet train style), on any fsspec URI.

    The tree is listed with a single recursive listing (``fs.find``: on S3 one paginated
    ``ListObjectsV2`` over the prefix, not one request per file). A file is an image if its name
    ends with one of :data:`IMAGE_EXTENSIONS` (any case); files and folders whose name starts
    with ``.`` are ignored; files below a class folder's sub-folders belong to that class (as in
    torchvision's ``ImageFolder``). Whether a file really is an image is found out when it is
    loaded.

    Parameters
    ----------
    root : str, local path or URI of the folder holding the class folders.
    classes : list of str or None. None: the sorted names of the folders that hold images. Given
        (e.g. the 1000 ImageNet wnids in logit order): label i is ``classes[i]``; folders not in
        it are ignored (see ``unlisted_folders``); a used class without images is a ValueError.
    max_images_per_class : int or None, keep the first n images (in sorted order) of each class.
    class_subset : list of str or None, keep only these classes; labels stay indices into the
        full ``classes`` list.
    storage_options : dict or None, passed to fsspec (e.g. ``{"anon": True}``).

    Attributes
    ----------
    classes, records : see :class:`ImageSource`; records are sorted by (label, path).
    fs, path : the filesystem and the root's path inside it.
    unlisted_folders : folders with images that are not in a given ``classes`` list.

    Raises
    ------
    ValueError
        Nothing found under ``root`` ("no images found under ..."), ``root`` does not exist, a
        used class has no images, a ``class_subset`` name is not a class, or a bad argument.
    """

    def __init__(
        self,
        root: str,
        *,
        classes: Sequence[str] | None = None,
        max_images_per_class: int | None = None,
        class_subset: Sequence[str] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if max_images_per_class is not None and (
            isinstance(max_images_per_class, bool) or not isinstance(max_images_per_class, (int, np.integer))
            or max_images_per_class < 1
        ):
            raise ValueError(f"max_images_per_class must be a positive integer or None, got {max_images_per_class!r}")
        given = None if classes is None else _check_names(classes, "classes")
        subset = None if class_subset is None else _check_names(class_subset, "class_subset")

        self.root = str(root).rstrip("/") or str(root)
        self.storage_options = dict(storage_options or {})
        self.fs, path = to_fs(self.root, self.storage_options)
        self.path = path.rstrip("/") or path
        self._local = "file" in ((self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol))

        by_class, n_other = self._list()
        exts = ", ".join(IMAGE_EXTENSIONS)
        if not by_class:
            if not self._exists():
                raise ValueError(f"no images found under {self.root}: it does not exist")
            other = f"found {n_other} other file(s); " if n_other else ""
            raise ValueError(
                f"no images found under {self.root} ({other}checked {self.root}/<class>/<image> "
                f"for extensions {exts}, any case)"
            )

        if given is None:
            self.classes = sorted(by_class)
            self.unlisted_folders: list[str] = []
        else:
            self.classes = given
            self.unlisted_folders = sorted(set(by_class) - set(given))
        index = {name: i for i, name in enumerate(self.classes)}

        if subset is not None:
            unknown = [n for n in subset if n not in index]
            if unknown:
                where = "the given classes list" if given is not None else f"the class folders under {self.root}"
                raise ValueError(f"class_subset names {len(unknown)} class(es) not in {where}: {', '.join(unknown[:20])}")
            used = sorted(subset, key=index.__getitem__)
        else:
            used = list(self.classes)
        self.class_subset = None if subset is None else used

        missing = [n for n in used if n not in by_class]
        if missing:
            more = f" (and {len(missing) - 20} more)" if len(missing) > 20 else ""
            raise ValueError(
                f"{len(missing)} class(es) have no folder with images under {self.root}: "
                f"{', '.join(missing[:20])}{more}"
            )

        records: list[Record] = []
        for name in used:
            rels = sorted(by_class[name])
            if max_images_per_class is not None:
                rels = rels[: int(max_images_per_class)]
            label = index[name]
            for rel in rels:
                records.append(Record(image_id=rel, uri=self._uri(rel), label=label))
        self.records = records
        self.max_images_per_class = max_images_per_class

    def _list(self) -> tuple[dict[str, list[str]], int]:
        """One recursive listing: {class folder: [relative paths of images]}, number of other files."""
        try:
            self.fs.invalidate_cache(self.path)
        except Exception:  # pragma: no cover - a filesystem without a cache
            pass
        try:
            paths = self.fs.find(self.path)
        except FileNotFoundError:
            paths = []
        except Exception as err:
            raise ValueError(f"cannot list {self.root}: {_describe(err)}") from err
        prefix = self.path.rstrip("/") + "/"
        by_class: dict[str, list[str]] = {}
        n_other = 0
        for p in paths:
            p = str(p)
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):]
            parts = rel.split("/")
            if len(parts) < 2 or any(_hidden(part) or not part for part in parts):
                n_other += 1
                continue
            if not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
                n_other += 1
                continue
            by_class.setdefault(parts[0], []).append(rel)
        return by_class, n_other

    def _exists(self) -> bool:
        try:
            return bool(self.fs.exists(self.path))
        except Exception:
            return False

    def _uri(self, rel: str) -> str:
        full = f"{self.path.rstrip('/')}/{rel}"
        return full if self._local else self.fs.unstrip_protocol(full)

    def load(self, record: Record) -> tuple[Image.Image | None, str | None]:
        return load_image(record.uri, self.fs)

    def _describe(self) -> str:
        return repr(self.root)


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


class CUBSource(ImageSource):
    """CUB-200-2011 in the layout of the official archive (``CUB_200_2011/``).

    Reads ``images.txt`` (id path), ``image_class_labels.txt`` (id class_id, 1-based),
    ``classes.txt`` (class_id name), ``train_test_split.txt`` (id is_train) and
    ``bounding_boxes.txt`` (id x y width height); images are at ``images/<path>``.

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
        self.root = str(root).rstrip("/") or str(root)
        self.split = split
        self.crop = bool(crop)
        self.storage_options = dict(storage_options or {})
        self.fs, path = to_fs(self.root, self.storage_options)
        self.path = path.rstrip("/") or path
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        self._local = "file" in protocols

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
        boxes: dict[int, tuple[float, float, float, float]] = {}
        if tables["bounding_boxes.txt"] is not None:
            for k, rest in self._rows(tables["bounding_boxes.txt"], "bounding_boxes.txt", 2):
                vals = rest.split()
                if len(vals) != 4:
                    raise ValueError(f"{self.root}/bounding_boxes.txt: image {k}: expected x y width height, got {rest!r}")
                boxes[int(k)] = tuple(float(v) for v in vals)  # type: ignore[assignment]

        for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)) + (
            (("bounding_boxes.txt", boxes),) if self.crop else ()
        ):
            lacking = sorted(set(paths) - set(table))
            if lacking:
                raise ValueError(f"{self.root}/{name} has no entry for image id(s) {lacking[:10]}")
        bad = sorted(k for k, v in labels.items() if k in paths and not 0 <= v < len(self.classes))
        if bad:
            raise ValueError(f"{self.root}/image_class_labels.txt: image id(s) {bad[:10]} have a class id not in classes.txt")

        keep = {"train": (1,), "test": (0,), "all": (0, 1)}[split]
        self.records = [
            Record(
                image_id=paths[k],
                uri=self._uri(f"images/{paths[k]}"),
                label=labels[k],
                bbox=boxes.get(k),
            )
            for k in sorted(paths)
            if is_train[k] in keep
        ]
        if not self.records:
            raise ValueError(f"no images found under {self.root} for split {split!r}")

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
            raise ValueError(f"cannot read {self.root}/{name}: {_describe(err)}") from err

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
        img, reason = load_image(record.uri, self.fs)
        if img is None or not self.crop or record.bbox is None:
            return img, reason
        box = _crop_box(record.bbox, img.size)
        if box is None:
            return None, f"bounding box outside the image: {record.uri}: box {record.bbox}, image {img.size}"
        return img.crop(box), None

    def _describe(self) -> str:
        return f"{self.root!r}, split={self.split!r}"


_SPLITS_TRAIN_VAL = ("train", "val", "all")


def _check_split(split: str, valid: tuple[str, ...], what: str) -> str:
    if split not in valid:
        raise ValueError(f"{what} split must be one of {', '.join(valid)}, got {split!r}")
    return split


class DigitsSource(ImageSource):
    """scikit-learn's handwritten digits (1797 real 8×8 images, 10 classes; ships with sklearn).

    Each 8×8 image (values 0-16, ink high) is scaled to 0-255 (ink bright on black, like MNIST),
    upsampled bilinearly to ``image_size`` and made RGB when loaded. ``split``: "train" and "val"
    are a stratified 80/20 split drawn with ``seed`` (``sklearn.model_selection.train_test_split``);
    "all" is every image. Records are in the data set's order; ``image_id`` is ``"digits/<index>"``.
    """

    def __init__(self, *, split: str, image_size: int = 64, seed: int = 0) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        self.split = _check_split(split, _SPLITS_TRAIN_VAL, "digits")
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
        self.image_size = int(image_size)
        self.seed = int(seed)
        digits = load_digits()
        self.images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (1797, 8, 8)
        self.targets = digits.target.astype(np.int64)
        self.classes = [str(c) for c in range(10)]
        idx = np.arange(len(self.targets))
        if split == "all":
            chosen = idx
        else:
            train, val = train_test_split(idx, test_size=0.2, stratify=self.targets, random_state=self.seed)
            chosen = np.sort(train if split == "train" else val)
        self.records = [
            Record(image_id=f"digits/{i:04d}", uri=f"sklearn://digits/{i:04d}", label=int(self.targets[i]), index=int(i))
            for i in chosen
        ]

    def load(self, record: Record) -> tuple[Image.Image | None, str | None]:
        try:
            small = Image.fromarray(np.ascontiguousarray(self.images[record.index]))
            S = self.image_size
            return small.resize((S, S), Image.Resampling.BILINEAR).convert("RGB"), None
        except Exception as err:  # pragma: no cover - only on a bad record
            return None, f"cannot load {record.uri}: {_describe(err)}"

    def _describe(self) -> str:
        return f"split={self.split!r}, image_size={self.image_size}, seed={self.seed}"


def _split_seed(seed: int, split: str) -> int:
    """The seed for a split: ``seed`` itself for train (so a train source equals
    ``make_synthetic_parts(..., seed=seed)``), an independent stream for val."""
    if split == "train":
        return int(seed)
    return int(np.random.SeedSequence([int(seed), 1]).generate_state(1, np.uint64)[0])


class SyntheticSource(ImageSource):
    """The part-annotated synthetic creatures of :func:`protonmf.synthetic.make_synthetic_parts`.

    ``split="train"`` draws with ``seed``, so it equals ``make_synthetic_parts(n_classes,
    n_per_class, image_size=image_size, seed=seed)`` (and an ImageFolder tree written from it by
    :func:`~protonmf.synthetic.write_image_folder`: same image ids, same pixels).
    ``split="val"`` draws from an independent seed stream derived from ``seed``.

    Attributes
    ----------
    data : the SyntheticParts; ``masks`` (N, S, S) uint8 part labels, ``part_names``.
    records : ``image_id`` is ``"<class name>/<index:06d>.png"`` (as in the written tree),
        ``index`` the row in ``data``.
    """

    def __init__(self, n_classes: int, n_per_class: int, *, split: str, image_size: int = 64, seed: int = 0) -> None:
        from protonmf.synthetic import make_synthetic_parts

        self.split = _check_split(split, ("train", "val"), "synthetic")
        self.seed = int(seed)
        self.data = make_synthetic_parts(n_classes, n_per_class, image_size=image_size, seed=_split_seed(self.seed, split))
        self.image_size = int(image_size)
        self.classes = list(self.data.class_names)
        self.records = [
            Record(
                image_id=f"{self.classes[int(c)]}/{i:06d}.png",
                uri=f"synthetic://seed{self.seed}/{split}/{self.classes[int(c)]}/{i:06d}.png",
                label=int(c),
                index=i,
            )
            for i, c in enumerate(self.data.labels)
        ]

    @property
    def masks(self) -> np.ndarray:
        return self.data.masks

    @property
    def part_names(self) -> tuple[str, ...]:
        return self.data.part_names

    def mask(self, record: Record) -> np.ndarray:
        """The (S, S) uint8 part-label map of ``record``'s image."""
        return self.data.masks[record.index]

    def load(self, record: Record) -> tuple[Image.Image | None, str | None]:
        try:
            return Image.fromarray(np.ascontiguousarray(self.data.images[record.index])), None
        except Exception as err:  # pragma: no cover - only on a bad record
            return None, f"cannot load {record.uri}: {_describe(err)}"

    def _describe(self) -> str:
        return f"split={self.split!r}, image_size={self.image_size}, seed={self.seed}"


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------

SOURCE_KINDS: dict[str, type[ImageSource]] = {
    "imagefolder": ImageFolderSource,
    "cub": CUBSource,
    "digits": DigitsSource,
    "synthetic": SyntheticSource,
}


def make_source(kind: str, *, name: str | None = None, **kwargs: Any) -> ImageSource:
    """Build a source by kind: ``"imagefolder"``, ``"cub"``, ``"digits"`` or ``"synthetic"``.

    ``kwargs`` go to the source's constructor (``root=...`` for imagefolder and cub). ``name``
    (e.g. ``"data.train"``) prefixes every error message. Unknown kinds, unknown or missing
    arguments and invalid data all raise ValueError.
    """
    prefix = f"{name}: " if name else ""
    cls = SOURCE_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"{prefix}unknown source kind {kind!r}; valid kinds: {', '.join(SOURCE_KINDS)}")
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"{prefix}unknown argument(s) {', '.join(unknown)} for source {kind!r}; valid: {', '.join(valid)}")
    missing = [
        p.name for p in params.values()
        if p.name != "self" and p.default is inspect.Parameter.empty and p.name not in kwargs
    ]
    if missing:
        raise ValueError(f"{prefix}source {kind!r} needs argument(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{prefix}{err}") from err


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _load_one(source: ImageSource, preprocess: Callable[[Image.Image], Tensor], record: Record) -> tuple[Tensor | None, str | None]:
    try:
        img, reason = source.load(record)
    except Exception as err:  # a source's load must not raise, but never let one stop the run
        return None, f"load failed: {record.uri}: {_describe(err)}"
    if img is None:
        return None, reason or f"load failed: {record.uri}"
    try:
        return preprocess(img), None
    except Exception as err:
        return None, f"preprocess failed: {record.uri}: {_describe(err)}"


def iter_batches(
    source: ImageSource,
    preprocess: Callable[[Image.Image], Tensor],
    batch_size: int,
    *,
    workers: int | None = None,
    records: Sequence[Record] | None = None,
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
    return _batches(source, preprocess, int(batch_size), workers, todo)


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


def _batches(source, preprocess, batch_size: int, workers: int, todo: list[Record]) -> Iterator[Batch]:
    crop = getattr(preprocess, "crop", None)

    def make(items: list[tuple[Record, Tensor]], skipped: list[Skipped]) -> Batch:
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
            if x is None:
                s = Skipped(rec.image_id, rec.uri, reason or "unknown")
                (held.skipped if held is not None else skipped).append(s)
                continue
            if held is not None:
                yield held
                held = None
            items.append((rec, x))
            if len(items) == batch_size:
                held = make(items, skipped)
                items, skipped = [], []
        if held is not None:
            yield held
        elif items or skipped:
            yield make(items, skipped)
    finally:
        for _, fut in pending:
            fut.cancel()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
