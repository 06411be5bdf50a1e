"""Decoding: bytes or a file through fsspec to an RGB PIL image, or a reason it cannot be read.

    :func:`load_image` reads a file through fsspec and decodes it with PIL into an RGB image.
    Grey, CMYK, 16-bit, palette and other modes are converted to RGB; images with transparency
    (RGBA, LA, PA, palette or grey/RGB with a ``tRNS`` transparency key) are composited on a
    **white** background. EXIF orientation is *not* applied (as torchvision's ``ImageFolder``
    loader, which the classifiers we explain were trained with). Unreadable, missing, zero-byte,
    truncated and non-image files give ``(None, reason)``; PIL's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone (False), so a truncated file is skipped and
    reported rather than loaded half-grey.

    A failed *read* is not a bad image: what the bytes show (empty, not an image, truncated, too
    large) and a missing object are skips, but a throttled, reset, timed-out or failed request is
    retried with backoff (:class:`ReadRetry`) and then raises :class:`ImageReadError`, so the
    class fails (and is retried) instead of losing the image without a word.
"""

from __future__ import annotations

import io
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from protonmf.storage import to_fs

T = TypeVar("T")

#: The background that transparent pixels are composited on.
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)


_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def describe_error(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class ImageReadError(OSError):
    """The bytes of an image could not be read (the network, the object store), as opposed to
    bytes that are no usable image: never a skip. An OSError: a step that raises it is retried."""


#: Errors that say the object is not there, or is a folder: the same answer on every attempt.
_ABSENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


@dataclass(frozen=True)
class ReadRetry:
    """How a read is retried: ``attempts`` in all, waiting ``backoff`` seconds before the second,
    twice as long before each next one up to ``cap``, each wait drawn uniformly below that
    ("full jitter": readers throttled together do not come back together).

    ``retried`` counts, by URI, the attempts that failed and were tried again (a run's summary
    names them: :attr:`~protonmf.data.extract.DecodedClass.retried`)."""

    attempts: int = 6
    backoff: float = 0.5
    cap: float = 20.0
    retried: Counter = field(default_factory=Counter, compare=False, repr=False)

    def retries_of(self, uris: Iterable[str]) -> int:
        """The failed attempts that were tried again, of reads of ``uris``."""
        return sum(self.retried.get(u, 0) for u in uris)

    def read(self, uri: str, read: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
        """``read()``, retried on any error but a missing object (raised at once: a skip to the
        caller) and a refused access (raised at once: a retry gets the same answer); when every
        attempt failed, :class:`ImageReadError` naming ``uri``, the attempts and the last error."""
        for attempt in range(1, self.attempts + 1):
            try:
                return read()
            except (*_ABSENT, PermissionError):
                raise
            except Exception as err:  # noqa: BLE001 - throttling, resets, timeouts, 5xx: all "try again"
                if attempt == self.attempts:
                    raise ImageReadError(f"read error: {uri}: {describe_error(err)} (after {attempt} attempt(s))") from err
                self.retried[uri] += 1  # one thread reads a URI at a time: no two threads add to one key
                sleep(random.uniform(0, min(self.cap, self.backoff * 2 ** (attempt - 1))))
        raise AssertionError("unreachable")


#: The default of every source (``storage.read_attempts`` and ``storage.read_backoff`` in a run).
READ_RETRY = ReadRetry()


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
        return None, f"not an image: {name}: {describe_error(err)}"
    except Image.DecompressionBombError as err:
        return None, f"image too large: {name}: {describe_error(err)}"
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        if "truncated" in str(err).lower() or isinstance(err, EOFError):
            return None, f"truncated image: {name}: {describe_error(err)}"
        return None, f"corrupt image: {name}: {describe_error(err)}"
    except Exception as err:  # a decoder bug must not stop a run over a million files
        return None, f"corrupt image: {name}: {describe_error(err)}"
    try:
        rgb = to_rgb(img)
        rgb.load()
    except Exception as err:
        return None, f"cannot convert image mode {img.mode} to RGB: {name}: {describe_error(err)}"
    return rgb, None


def load_image(uri: str, fs: Any = None, retry: ReadRetry = READ_RETRY) -> tuple[Image.Image | None, str | None]:
    """Read and decode the image at ``uri``.

    Parameters
    ----------
    uri : str, a path in ``fs`` or a full URI (``s3://bucket/key``, ``file:///x``, a local path).
    fs : fsspec filesystem or None (then the one of ``uri``, with credentials from the
        environment).
    retry : how a failed read is retried (:class:`ReadRetry`).

    Returns
    -------
    (image, None) with an RGB PIL image (see :func:`to_rgb`), or (None, reason) where reason
    starts with ``"missing file"``, ``"read error"`` (a folder), ``"empty file"``, ``"not an image"``,
    ``"truncated image"``, ``"corrupt image"`` or ``"image too large"``.

    Raises
    ------
    ImageReadError : every attempt to read the bytes failed. PermissionError : access refused.
    """
    if fs is None:
        fs, path = to_fs(uri)
    else:
        path = uri
    try:
        data = retry.read(uri, lambda: fs.cat_file(path))
    except FileNotFoundError as err:
        return None, f"missing file: {uri}: {describe_error(err)}"
    except (IsADirectoryError, NotADirectoryError) as err:
        return None, f"read error: {uri} is a directory: {describe_error(err)}"
    return decode_image(data, uri)
