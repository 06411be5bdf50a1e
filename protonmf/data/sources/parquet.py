"""Parquet shards of encoded images and integer labels: the layout of Hugging Face's ``imagenet-1k``.

Each shard has a column ``image``, either a struct ``{bytes, path}`` (Hugging Face's ``Image``
feature) or plain binary, holding the encoded file (JPEG, PNG, ...), and a column ``label`` of
integers. Class names: see :mod:`protonmf.data.sources.shards` (``data.classes``, a
``classes.txt`` beside the shards, or the ``ClassLabel`` names Hugging Face writes into each
shard's schema metadata).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from protonmf.data.decode import decode_image, describe_error
from protonmf.data.records import Record
from protonmf.data.sources.shards import (
    Shard, ShardSource, check_labels, full_uri, in_threads, keep_first, no_class_names, read_classes_txt, shard_folder,
)

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"

#: Row groups of images kept decoded-from-Parquet per source (a class's records come shard by
#: shard, row by row, so consecutive loads mostly hit the last few row groups).
CACHED_ROW_GROUPS = 8


def _hf_class_names(schema: pa.Schema) -> list[str] | None:
    """The ``ClassLabel`` names of the label column in a Hugging Face shard's schema metadata."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        features = json.loads(raw)["info"]["features"]
        names = features[LABEL_COLUMN]["names"]
    except (KeyError, TypeError, ValueError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


class ParquetSource(ShardSource):
    """Images stored as bytes in Parquet shards, with integer labels (Hugging Face ``imagenet-1k``).

    Listing reads only each shard's footer and its ``label`` column (and the images' ``path``
    when the column is a struct), a few kilobytes per shard, on several threads. Records are in
    shard order, then row order; ``image_id`` is the image's ``path`` when every image has a
    distinct one, else ``<shard file>/<row>``; ``uri`` is ``<shard URI>#<row>`` and ``index`` the
    row in its shard. :meth:`load` reads the row group that holds the image (cached, so the images
    of one row group cost one read) and decodes the bytes as every other source does.

    Parameters
    ----------
    root : a folder of ``*.parquet`` shards or a glob pattern, local or any fsspec URI.
    classes : names of the labels (label i is ``classes[i]``) or None (see the module docstring).
    max_images_per_class : keep the first n images (in shard, row order) of each class.
    storage_options : passed to fsspec.
    """

    SUFFIX = ".parquet"

    def _list_records(self, given: list[str] | None, limit: int | None) -> tuple[list[str], list[Record]]:
        listed = in_threads(self._list_shard, self.shards)
        names = given or read_classes_txt(self.fs, shard_folder(self.path)) or next(
            (n for _, _, n in listed if n), None)
        if names is None:
            raise no_class_names(self.root, ", or shards with Hugging Face ClassLabel metadata")
        labels = np.concatenate([lab for _, lab, _ in listed]) if listed else np.zeros(0, np.int64)
        where = np.concatenate([np.stack([np.full(len(lab), s), np.arange(len(lab))], 1) for s, (_, lab, _) in enumerate(listed)])
        check_labels(labels.tolist(), len(names),
                     lambda i: f"{self.shards[int(where[i, 0])].path} row {int(where[i, 1])}")
        paths = [p for ps, _, _ in listed for p in ps]
        distinct = all(paths) and len(set(paths)) == len(paths)
        order = np.argsort(labels, kind="stable")  # by class, then shard and row
        keep = [int(order[i]) for i in keep_first(labels[order].tolist(), limit)]
        records = []
        for i in keep:
            s, row = int(where[i, 0]), int(where[i, 1])
            shard = self.shards[s].path
            records.append(Record(
                image_id=paths[i] if distinct else f"{shard.rsplit('/', 1)[-1]}/{row}",
                uri=f"{full_uri(self.fs, shard, self._local)}#{row}",
                label=int(labels[i]),
                index=row,
            ))
        return names, records

    def _open(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        super()._open(root, storage_options)
        self._lock = threading.Lock()
        self._footers: dict[str, np.ndarray] = {}
        self._groups: OrderedDict[tuple[str, int], Future] = OrderedDict()

    def _list_shard(self, shard: Shard) -> tuple[list[str | None], np.ndarray, list[str] | None]:
        """(image paths or Nones, labels, Hugging Face class names) of one shard."""
        try:
            with self.fs.open(shard.path, "rb") as f:
                pf = pq.ParquetFile(f)
                schema = pf.schema_arrow
                for column in (IMAGE_COLUMN, LABEL_COLUMN):
                    if column not in schema.names:
                        raise ValueError(f"shard {shard.path} has no column {column!r} (columns: {', '.join(schema.names)})")
                struct = pa.types.is_struct(schema.field(IMAGE_COLUMN).type)
                has_path = struct and schema.field(IMAGE_COLUMN).type.get_field_index("path") >= 0
                table = pf.read(columns=[LABEL_COLUMN] + ([f"{IMAGE_COLUMN}.path"] if has_path else []))
        except ValueError:
            raise
        except Exception as err:
            raise ValueError(f"cannot read the shard {shard.path}: {describe_error(err)}") from err
        labels = table[LABEL_COLUMN].to_numpy(zero_copy_only=False)
        if labels.dtype.kind not in "iu" or table[LABEL_COLUMN].null_count:
            raise ValueError(f"shard {shard.path}: column {LABEL_COLUMN!r} must hold integers without nulls")
        paths = table[IMAGE_COLUMN].combine_chunks().field("path").to_pylist() if has_path else [None] * len(labels)
        return paths, labels.astype(np.int64), _hf_class_names(schema)

    # ------------------------------------------------------------------ loading
    def _row_starts(self, shard: str) -> np.ndarray:
        """The first row of each row group of ``shard`` (its footer, read once)."""
        with self._lock:
            starts = self._footers.get(shard)
        if starts is None:
            with self.fs.open(shard, "rb") as f:
                meta = pq.ParquetFile(f).metadata
            starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
            with self._lock:
                self._footers[shard] = starts
        return starts

    def _row_group(self, shard: str, group: int) -> pa.Array:
        """The image column of one row group, read once however many threads ask for it."""
        key = (shard, group)
        with self._lock:
            fut = self._groups.get(key)
            mine = fut is None
            if mine:
                fut = self._groups[key] = Future()
                while len(self._groups) > CACHED_ROW_GROUPS:
                    self._groups.popitem(last=False)
            else:
                self._groups.move_to_end(key)
        if mine:
            try:
                with self.fs.open(shard, "rb") as f:
                    fut.set_result(pq.ParquetFile(f).read_row_group(group, columns=[IMAGE_COLUMN])[IMAGE_COLUMN].combine_chunks())
            except BaseException as err:
                with self._lock:
                    self._groups.pop(key, None)
                fut.set_exception(err)
        return fut.result()

    def load(self, record: Record) -> tuple[Image.Image | None, str | None]:
        shard = record.uri.rsplit("#", 1)[0]
        row = int(record.index)
        try:
            starts = self.read_retry.read(record.uri, lambda: self._row_starts(shard))
            if row >= starts[-1]:
                return None, f"missing file: {record.uri}: the shard has {int(starts[-1])} rows"
            group = int(np.searchsorted(starts, row, side="right")) - 1
            value = self.read_retry.read(record.uri, lambda: self._row_group(shard, group))[row - int(starts[group])]
        except FileNotFoundError as err:
            return None, f"missing file: {record.uri}: {describe_error(err)}"
        data = value.as_py()
        if isinstance(data, dict):
            data = data.get("bytes")
        return decode_image(data or b"", record.uri)

    def _describe(self) -> str:
        return repr(self.root)
