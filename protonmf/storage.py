"""Every location is a URI (local path, ``file://``, ``s3://``, ``gs://``, ...), opened through fsspec.

S3 endpoint and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) or from ``storage_options``.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

__all__ = ["IN_FLIGHT", "class_of_stem", "class_stem", "concurrently", "fs_options", "join", "parquet_bytes", "parquet_table", "read_bytes",
           "sha256", "to_fs", "write_bytes_atomic", "write_objects"]

T = TypeVar("T")
R = TypeVar("R")

#: Requests kept in flight by :func:`concurrently`: object storage answers each in tens of
#: milliseconds, so small objects read or written one after another leave a worker waiting.
IN_FLIGHT = 16


#: fsspec protocols of object stores: no folders, a PUT replaces an object atomically.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def to_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem of ``uri`` and the path inside it.

    Without fsspec's listings cache: fsspec keeps one filesystem object per process, a Ray worker
    runs task after task, and other processes write markers, staging files and manifests in the
    meantime; a listing cached by an earlier task would say they are not there.
    """
    if not isinstance(uri, (str, os.PathLike)) or not str(uri):
        raise ValueError(f"expected a path or URI, got {uri!r}")
    return fsspec.core.url_to_fs(str(uri), **fs_options(uri, storage_options))


def fs_options(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options every filesystem of ``uri`` is opened with (``storage_options`` win): no
    listings cache (see :func:`to_fs`), and on S3 one GET per read: s3fs otherwise asks for an
    object's size (a HEAD request) before every read, to split large ones into parallel ranges,
    which doubles the requests for the small objects a run reads by the thousand (images,
    markers, record tables, Zarr chunks); botocore's adaptive retry mode."""
    options: dict[str, Any] = {"use_listings_cache": False}
    if str(uri).split("://", 1)[0] in ("s3", "s3a"):
        options["max_concurrency"] = 1
        # botocore's adaptive retries: throttled clients also slow down (the reads of a class retry
        # on top of these: protonmf.data.decode.ReadRetry)
        options["config_kwargs"] = {"retries": {"mode": "adaptive"}}
    return {**options, **(storage_options or {})}


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *parts])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_bytes(fs: AbstractFileSystem, path: str) -> bytes:
    return fs.cat_file(path)


def parquet_bytes(table: pa.Table, **options: Any) -> bytes:
    """``table`` as the bytes of a Parquet file (``options``: those of ``pyarrow.parquet.write_table``)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return sink.getvalue().to_pybytes()


def parquet_table(data: bytes) -> pa.Table:
    """The table of a Parquet file's bytes (:func:`parquet_bytes`)."""
    return pq.read_table(pa.BufferReader(data))


def concurrently(fn: Callable[[T], R], items: Iterable[T], threads: int = IN_FLIGHT) -> list[R]:
    """``[fn(x) for x in items]``, with up to ``threads`` calls at once (for work that waits on
    storage). Results in the order of ``items``; the error of the first item that fails, in that
    order, is raised once every call has ended."""
    items = list(items)
    if len(items) <= 1 or threads <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def write_bytes_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that a reader sees the old object or the whole new one, never a part.

    Object stores replace an object atomically on PUT (and have no folders to make: s3fs's
    ``makedirs`` would only ask for the bucket, once per write); on a local disk we write a
    temporary file beside the target and rename it.
    """
    protocols = _protocols(fs)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and not set(protocols) & OBJECT_STORES:
        fs.makedirs(parent, exist_ok=True)
    if "file" in protocols:
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_objects(fs: AbstractFileSystem, objects: dict[str, bytes]) -> None:
    """:func:`write_bytes_atomic` of each of ``objects`` (path → bytes); on object stores all the
    PUTs at once (each replaces its object atomically), elsewhere one after another."""
    if set(_protocols(fs)) & OBJECT_STORES:
        fs.pipe(objects)
    else:
        for path, data in objects.items():
            write_bytes_atomic(fs, path, data)


def _protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def class_stem(k: int) -> str:
    """The name under which class ``k``'s files are kept in every store and artifact: ``c00042``."""
    return f"c{k:05d}"


def class_of_stem(stem: str) -> int | None:
    """The class of a :func:`class_stem` name, or None if ``stem`` is not one."""
    return int(stem[1:]) if len(stem) == 6 and stem[0] == "c" and stem[1:].isdigit() else None
