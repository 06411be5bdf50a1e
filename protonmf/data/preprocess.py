"""Preprocessing: resize, centre crop, normalise, and back again for display."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from protonmf.data.decode import to_rgb


IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)



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
            ]
        )

    @property
    def transform(self):
        """The torchvision v2 pipeline up to the uint8 crop (built once per instance)."""
        t = self.__dict__.get("_transform")
        if t is None:
            t = self._build()
            object.__setattr__(self, "_transform", t)  # a cache, not a field: not in eq/hash/repr
        return t

    def to_uint8(self, img: Image.Image) -> Tensor:
        """Resize and crop: the (3, crop, crop) uint8 image, before scaling and normalizing.

        Extraction ships images between processes in this form (a quarter of float32's bytes) and
        normalizes them where the forward pass runs; ``normalize(to_uint8(img))`` is ``self(img)``
        to the bit.
        """
        if isinstance(img, Image.Image):
            img = to_rgb(img)
        out = self.transform(img)
        return out.as_subclass(Tensor) if isinstance(out, Tensor) else out

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 images (..., 3, S, S) → float32 scaled to [0, 1] and normalized with mean/std."""
        from torchvision.transforms.v2 import functional as F

        return F.normalize(F.to_dtype(images, torch.float32, scale=True), mean=list(self.mean), std=list(self.std))

    def __call__(self, img: Image.Image) -> Tensor:
        return self.normalize(self.to_uint8(img))

    def _placement(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(resized width, resized height, crop left, crop top) for an image of ``size`` (width,
        height), in torchvision's arithmetic: the shorter side becomes ``resize`` and the longer
        one ``int(resize · long / short)``, then a centre crop starting at ``round((side − crop) / 2)``."""
        W, H = int(size[0]), int(size[1])
        if W < 1 or H < 1:
            raise ValueError(f"image size must be positive, got {size!r}")
        short, long = min(W, H), max(W, H)
        new_long = int(self.resize * long / short)
        new_W, new_H = (self.resize, new_long) if W <= H else (new_long, self.resize)
        return new_W, new_H, int(round((new_W - self.crop) / 2.0)), int(round((new_H - self.crop) / 2.0))

    def map_points(self, points: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Pixel positions in an image of ``size`` (width, height) → positions in its preprocessed
        (crop × crop) version, and whether they are inside it (see :meth:`_placement`).

        Parameters
        ----------
        points : (..., 2) array of (x, y). size : the original image's (width, height).
        """
        W, H = int(size[0]), int(size[1])
        new_W, new_H, left, top = self._placement(size)
        pts = np.asarray(points, dtype=np.float64)
        out = np.stack([pts[..., 0] * new_W / W - left, pts[..., 1] * new_H / H - top], -1)
        inside = (out[..., 0] >= 0) & (out[..., 0] < self.crop) & (out[..., 1] >= 0) & (out[..., 1] < self.crop)
        return out, inside

    def unmap_points(self, points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Positions in the preprocessed (crop × crop) image → pixel positions in the original image
        of ``size`` (width, height): the inverse of :meth:`map_points`.

        Parameters
        ----------
        points : (..., 2) array of (x, y) in the crop. size : the original image's (width, height).
        """
        W, H = int(size[0]), int(size[1])
        new_W, new_H, left, top = self._placement(size)
        pts = np.asarray(points, dtype=np.float64)
        return np.stack([(pts[..., 0] + left) * W / new_W, (pts[..., 1] + top) * H / new_H], -1)

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
