"""Image sources: every source offers ``classes``, ``records`` and ``load(record)``; :func:`make_source` builds one by kind."""

from __future__ import annotations

import inspect
from typing import Any

from protonmf.data.sources.base import ImageSource
from protonmf.data.sources.cub import CUBSource
from protonmf.data.sources.imagefolder import ImageFolderSource
from protonmf.data.sources.in_memory import DigitsSource, ShapesSource, SyntheticSource
from protonmf.data.sources.parquet import ParquetSource
from protonmf.data.sources.webdataset import WebDatasetSource

__all__ = [
    "SOURCE_KINDS", "CUBSource", "DigitsSource", "ImageFolderSource", "ImageSource", "ParquetSource", "WebDatasetSource",
    "IN_MEMORY_KINDS", "make_source",
]

#: Kinds whose images are made in memory (nothing to list or index, nothing read from storage).
IN_MEMORY_KINDS = ("synthetic", "shapes", "digits")

SOURCE_KINDS: dict[str, type[ImageSource]] = {
    "imagefolder": ImageFolderSource,
    "cub": CUBSource,
    "digits": DigitsSource,
    "synthetic": SyntheticSource,
    "shapes": ShapesSource,
    "parquet": ParquetSource,
    "webdataset": WebDatasetSource,
}


def make_source(kind: str, *, name: str | None = None, **kwargs: Any) -> ImageSource:
    """Build a source by kind: ``"imagefolder"``, ``"cub"``, ``"parquet"``, ``"webdataset"``,
    ``"digits"``, ``"synthetic"`` or ``"shapes"``.

    ``kwargs`` go to the source's constructor (``root=...`` for the kinds that read storage). ``name``
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


