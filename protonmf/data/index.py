"""The dataset index: a split's records, listed once, as one Parquet file that every other process
reads instead of listing the data again.

Listing ImageNet's training set on S3 is ~1,300 LIST requests and a million Python objects; a
run's prepare step lists once and writes the index, and workers read only the rows of their
classes (a few hundred kilobytes) with no LIST at all.

Columns (:data:`INDEX_SCHEMA`), one row per image:

| column | meaning |
|---|---|
| ``image_id``, ``uri`` | as in :class:`~protonmf.data.records.Record` |
| ``class_name``, ``label`` | the class and its index in the source's classes |
| ``split`` | "train" or "val" |
| ``bbox_x``, ``bbox_y``, ``bbox_w``, ``bbox_h`` | CUB's bounding box (else null) |
| ``index`` | row in an in-memory array or a Parquet shard (else null) |
| ``offset``, ``size`` | the image's bytes in a tar shard (else null) |
| ``version`` | what the listing says of the image's bytes (ETag, size and mtime; else null) |

Rows are sorted by label and written in row groups of :data:`ROW_GROUP_ROWS` rows, so reading a
few classes reads only the row groups whose label range (their min/max statistics) holds them.
The schema metadata ``protonmf.index`` holds the source kind, what loading needs
(:meth:`~protonmf.data.sources.base.ImageSource.index_settings`), every class name in label order,
the split, and each class's :func:`~protonmf.data.records.images_sha256` (``images_sha256``, in
label order): what a class is made from, read from the footer alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from protonmf.data.records import Record, images_sha256
from protonmf.data.sources import SOURCE_KINDS, ImageSource
from protonmf.storage import join, parquet_bytes, to_fs, write_bytes_atomic

__all__ = ["INDEX_SCHEMA", "ROW_GROUP_ROWS", "class_digests", "class_sizes", "index_bytes", "index_table", "open_index", "read_index", "write_index"]

INDEX_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("class_name", pa.string()),
    ("label", pa.int32()),
    ("split", pa.string()),
    ("bbox_x", pa.float64()),
    ("bbox_y", pa.float64()),
    ("bbox_w", pa.float64()),
    ("bbox_h", pa.float64()),
    ("index", pa.int64()),
    ("offset", pa.int64()),
    ("nbytes", pa.int64()),
    ("width", pa.int32()),  # the loaded image's size, where the source knows it without decoding
    ("height", pa.int32()),
    ("keypoints", pa.list_(pa.struct([("x", pa.float64()), ("y", pa.float64()), ("visible", pa.bool_())]))),
    ("version", pa.string()),
])

#: Rows per row group: ImageNet's 1.28M training images make ~160 groups, a class lies in one or two.
ROW_GROUP_ROWS = 8192

_META_KEY = b"protonmf.index"
_BBOX = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")


def _kind_of(source: ImageSource) -> str:
    for kind, cls in SOURCE_KINDS.items():
        if type(source) is cls:
            return kind
    raise ValueError(f"{type(source).__name__} is not a source kind ({', '.join(SOURCE_KINDS)})")


def index_table(source: ImageSource, split: str) -> pa.Table:
    """The index of ``source``'s records (sorted by label, stable), its settings in the metadata."""
    records = sorted(source.records, key=lambda r: r.label)
    meta = {"kind": _kind_of(source), "settings": source.index_settings(), "classes": list(source.classes), "split": split,
            "keypoint_names": list(getattr(source, "keypoint_names", None) or []),
            "images_sha256": class_digests(records, len(source.classes))}
    columns: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
    for r in records:
        columns["image_id"].append(r.image_id)
        columns["uri"].append(r.uri)
        columns["class_name"].append(source.classes[r.label])
        columns["label"].append(r.label)
        columns["split"].append(split)
        for name, value in zip(_BBOX, r.bbox or (None,) * 4):
            columns[name].append(value)
        for name in ("index", "offset", "nbytes", "version"):
            columns[name].append(getattr(r, name))
        columns["width"].append(r.size[0] if r.size else None)
        columns["height"].append(r.size[1] if r.size else None)
        columns["keypoints"].append(None if r.keypoints is None else [{"x": x, "y": y, "visible": v} for x, y, v in r.keypoints])
    table = pa.table(columns, schema=INDEX_SCHEMA)
    return table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})


def class_digests(records: Sequence[Record], num_classes: int) -> list[str]:
    """:func:`~protonmf.data.records.images_sha256` of each class's records (in their order), in label order."""
    by_label: list[list[Record]] = [[] for _ in range(num_classes)]
    for r in records:
        by_label[r.label].append(r)
    return [images_sha256(rs) for rs in by_label]


def index_bytes(table: pa.Table) -> bytes:
    """The index as Parquet bytes (row groups of :data:`ROW_GROUP_ROWS`, with statistics)."""
    return parquet_bytes(table, row_group_size=ROW_GROUP_ROWS, write_statistics=True)


def write_index(
    table: pa.Table, folder: str, *, storage_options: dict[str, Any] | None = None, name: str | None = None,
) -> str:
    """Write ``table`` to ``<folder>/<name>`` unless it is there; its URI.

    ``name`` defaults to ``<split>-<hash of the index's bytes>.parquet``: named by content, a run
    that lists the same data finds its index already written, and a changed listing gets a new
    file (runs that used the old one can still read it).
    """
    data = index_bytes(table)
    if name is None:
        split = json.loads(table.schema.metadata[_META_KEY])["split"]
        name = f"{split}-{hashlib.sha256(data).hexdigest()[:16]}.parquet"
    fs, root = to_fs(folder, storage_options)
    path = join(root, name)
    if not fs.exists(path):
        write_bytes_atomic(fs, path, data)
    return join(str(folder), name)


@contextmanager
def _opened(uri: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[pq.ParquetFile, dict[str, Any]]]:
    """The index file at ``uri`` opened (footer read, nothing else) and the metadata it carries."""
    fs, path = to_fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        meta = pf.schema_arrow.metadata or {}
        if _META_KEY not in meta:
            raise ValueError(f"{uri} is not a protonmf dataset index")
        yield pf, json.loads(meta[_META_KEY])


def read_index(
    uri: str, *, labels: Sequence[int] | None = None, storage_options: dict[str, Any] | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """(rows, metadata) of the index at ``uri``; with ``labels`` only those classes' rows, reading
    only the row groups whose label statistics can hold them. Opens one file: no listing."""
    with _opened(uri, storage_options) as (pf, info):
        if labels is None:
            table = pf.read()
        else:
            wanted = sorted({int(k) for k in labels})
            column = pf.schema_arrow.get_field_index("label")
            groups = []
            for g in range(pf.metadata.num_row_groups):
                stats = pf.metadata.row_group(g).column(column).statistics
                if stats is None or not stats.has_min_max or any(stats.min <= k <= stats.max for k in wanted):
                    groups.append(g)
            table = pf.read_row_groups(groups) if groups else INDEX_SCHEMA.empty_table()
            table = table.filter(pc.is_in(table["label"], pa.array(wanted, pa.int32())))
    return table, info


def class_sizes(uri: str, *, storage_options: dict[str, Any] | None = None) -> list[int]:
    """The number of rows (images) of each class of the index at ``uri``, in label order: its
    label column alone is read."""
    with _opened(uri, storage_options) as (pf, info):
        labels = pf.read(columns=["label"])["label"].to_numpy()
    return np.bincount(labels, minlength=len(info["classes"])).tolist()


def _records(table: pa.Table) -> list[Record]:
    if "version" not in table.column_names:  # an index written before versions: none known
        table = table.append_column("version", pa.nulls(table.num_rows, pa.string()))
    cols = {name: table[name].to_pylist() for name in INDEX_SCHEMA.names}
    return [
        Record(
            image_id=cols["image_id"][i], uri=cols["uri"][i], label=cols["label"][i],
            bbox=None if cols["bbox_x"][i] is None else tuple(cols[n][i] for n in _BBOX),
            index=cols["index"][i], offset=cols["offset"][i], nbytes=cols["nbytes"][i], version=cols["version"][i],
            size=None if cols["width"][i] is None else (cols["width"][i], cols["height"][i]),
            keypoints=None if cols["keypoints"][i] is None else tuple((k["x"], k["y"], k["visible"]) for k in cols["keypoints"][i]),
        )
        for i in range(table.num_rows)
    ]


def open_index(
    uri: str, *, labels: Sequence[int] | None = None, storage_options: dict[str, Any] | None = None,
) -> ImageSource:
    """The source that wrote the index, with every class and the records of ``labels`` (default
    all), built without listing the data."""
    table, info = read_index(uri, labels=labels, storage_options=storage_options)
    cls = SOURCE_KINDS[info["kind"]]
    source = cls.from_index(info["settings"], info["classes"], _records(table), storage_options)
    if info.get("keypoint_names"):  # part names of the keypoints the records carry (CUB)
        source.keypoint_names = tuple(info["keypoint_names"])
    return source
