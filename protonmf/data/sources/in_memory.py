"""Sources held in memory: scikit-learn's 8×8 digits (no download) and the two synthetic part sets (with part masks)."""

from __future__ import annotations


import numpy as np
from PIL import Image

from protonmf.data.decode import describe_error
from protonmf.data.records import Record
from protonmf.data.sources.base import ImageSource

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
            return None, f"cannot load {record.uri}: {describe_error(err)}"

    def _describe(self) -> str:
        return f"split={self.split!r}, image_size={self.image_size}, seed={self.seed}"


def _split_seed(seed: int, split: str) -> int:
    """The seed for a split: ``seed`` itself for train (so a train source equals
    ``make_synthetic_parts(..., seed=seed)``), an independent stream for val."""
    if split == "train":
        return int(seed)
    return int(np.random.SeedSequence([int(seed), 1]).generate_state(1, np.uint64)[0])


def _mask_centres(masks: np.ndarray, n_parts: int) -> list[list[tuple[float, float, bool]]]:
    """One keypoint per part: the centre (mean x, mean y) of its pixels in ``masks`` (N, S, S);
    visible where the part has pixels."""
    N, S, _ = masks.shape
    ys, xs = np.mgrid[0:S, 0:S]
    out = []
    for j in range(1, n_parts + 1):
        on = masks == j  # (N, S, S)
        count = on.sum((1, 2))
        cx = (on * xs).sum((1, 2)) / np.maximum(count, 1)
        cy = (on * ys).sum((1, 2)) / np.maximum(count, 1)
        out.append(np.stack([cx, cy, count > 0], 1))
    return np.stack(out, 1).tolist()  # (N, parts, 3)


class SyntheticSource(ImageSource):
    """The part-annotated synthetic creatures of :func:`protonmf.demo.synthetic.make_synthetic_parts`.

    ``split="train"`` draws with ``seed``, so it equals ``make_synthetic_parts(n_classes,
    n_per_class, image_size=image_size, seed=seed)`` (and an ImageFolder tree written from it by
    :func:`~protonmf.demo.synthetic.write_image_folder`: same image ids, same pixels).
    ``split="val"`` draws from an independent seed stream derived from ``seed``.

    Attributes
    ----------
    data : the SyntheticParts; ``masks`` (N, S, S) uint8 part labels, ``part_names``.
    records : ``image_id`` is ``"<class name>/<index:06d>.png"`` (as in the written tree),
        ``index`` the row in ``data``, ``keypoints`` one per part (head, body, tail): the centre of
        its mask, visible where the part has pixels.
    """

    kind = "synthetic"

    @staticmethod
    def _make(n_classes: int, n_per_class: int, *, image_size: int, seed: int):
        from protonmf.demo.synthetic import make_synthetic_parts

        return make_synthetic_parts(n_classes, n_per_class, image_size=image_size, seed=seed)

    def __init__(self, n_classes: int, n_per_class: int, *, split: str, image_size: int = 64, seed: int = 0) -> None:
        self.split = _check_split(split, ("train", "val"), self.kind)
        self.seed = int(seed)
        self.data = self._make(n_classes, n_per_class, image_size=image_size, seed=_split_seed(self.seed, split))
        self.image_size = int(image_size)
        self.classes = list(self.data.class_names)
        self.keypoint_names = tuple(self.data.part_names[1:])
        points = _mask_centres(self.data.masks, len(self.keypoint_names))
        S = self.data.masks.shape[1]
        self.records = [
            Record(
                image_id=f"{self.classes[int(c)]}/{i:06d}.png",
                uri=f"{self.kind}://seed{self.seed}/{split}/{self.classes[int(c)]}/{i:06d}.png",
                label=int(c),
                index=i,
                keypoints=tuple((float(x), float(y), bool(v)) for x, y, v in points[i]),
                size=(S, S),
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
            return None, f"cannot load {record.uri}: {describe_error(err)}"

    def _describe(self) -> str:
        return f"split={self.split!r}, image_size={self.image_size}, seed={self.seed}"




class ShapesSource(SyntheticSource):
    """The second part-annotated set, :func:`protonmf.demo.shapes.make_shapes` (cap, trunk, base),
    read as :class:`SyntheticSource` reads the creatures (same splits, records and keypoints)."""

    kind = "shapes"

    @staticmethod
    def _make(n_classes: int, n_per_class: int, *, image_size: int, seed: int):
        from protonmf.demo.shapes import make_shapes

        return make_shapes(n_classes, n_per_class, image_size=image_size, seed=seed)
