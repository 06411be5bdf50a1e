"""The feature store: backbone features per class in Zarr v3, image records in Parquet.

Layout under the store's URI (local path or any fsspec URI):

- ``zarr.json``: the root group; its attributes hold the store's ``key`` (a hash of everything
  that determines the features: backbone, weights, feature layer, preprocessing, data), the
  feature grid (h, w), the channel count D, and the class names in logit order.
- ``head.safetensors``: the black box's head, ``V`` (K, D) and ``bias`` (K,).
- ``c00042/``: class 42's features, an array of shape (n_images, h·w, D), float16, chunked by
  blocks of ``chunk_images`` images. One writer owns a class, so writers never share a chunk, and
  rewriting a class writes the same chunks again (idempotent).
- ``tables/c00042.parquet``: one row per image of class 42, written before its marker:
  image_id, uri, label, row (index in the class array, null if skipped), pred, top_classes,
  top_logits (the black box's top logits), skipped (reason, null if the image was used).
- ``done/c00042.json``: the completion marker, written last: a class without it is not there. It
  holds the sha256 of each chunk's float16 bytes and of the record table, and every read checks
  what it reads against them (the features alone are the marker and the chunks): Zarr reads a
  lost chunk as zeros without a word, and a garbage chunk fails with a codec error that names no
  class. A damaged class raises :class:`StoreError` naming the class, the
  store and what is wrong; extraction re-extracts it (:mod:`protonmf.data.extract`).
  Markers written before the checksums (no ``features_sha256``) cannot be checked: their classes
  count as damaged and are re-extracted, since nothing in them tells a lost chunk from features.
  The marker also holds a copy of the class array's ``zarr.json`` (``array``): a read takes the
  array's metadata from it and fetches only the chunks (on S3 a request per class fewer); the
  array's own ``zarr.json`` is still written, for Zarr and for markers without the copy.
  And it holds what the class was made from (``images_sha256``,
  :func:`~protonmf.data.records.images_sha256` of its records): a rerun compares it with the
  listing's and extracts again only a class whose images changed (:meth:`FeatureStore.made_from`),
  reading no chunk.

Features are stored after clamping negatives to 0 only if the writer asks; the default stores
them as the backbone gives them (the NMF clamps its own input).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import zarr
import zarr.errors
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from protonmf.storage import (
    class_stem, concurrently, fs_options, join, parquet_bytes, parquet_table, read_bytes, sha256, to_fs, write_bytes_atomic,
    write_objects,
)

__all__ = ["FeatureStore", "RECORD_SCHEMA", "StoreError"]

FORMAT = "protonmf.features"
FORMAT_VERSION = 1

RECORD_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("label", pa.int32()),
        ("row", pa.int32()),
        ("pred", pa.int32()),
        ("top_classes", pa.list_(pa.int32())),
        ("top_logits", pa.list_(pa.float32())),
        ("skipped", pa.string()),
    ]
)


class StoreError(ValueError):
    """A feature store is missing, was made with other settings, lacks a class, or a class is damaged."""


def _marker_damage(k: int, marker: dict[str, Any] | None) -> str | None:
    """What makes class k's marker useless for checking the class (None if it is fine)."""
    if marker is None:
        return f"its marker done/{class_stem(k)}.json is not valid JSON"
    if not {"features_sha256", "chunk_images", "records_sha256"} <= set(marker):
        return "its marker holds no checksums (written by an earlier protonmf), so it cannot be verified"
    return None


def _zarr_options(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """What Zarr opens the filesystem of a remote ``uri`` with: the project's (:func:`fs_options`)."""
    return fs_options(uri, storage_options) if "://" in str(uri) and not str(uri).startswith("file://") else None


def _chunk_digests(data: np.ndarray, rows: int) -> list[str]:
    """sha256 of each block of ``rows`` images of ``data`` (n, h·w, D) float16: one per Zarr chunk."""
    return [sha256(np.ascontiguousarray(data[s:s + rows]).tobytes()) for s in range(0, data.shape[0], rows)]


class FeatureStore:
    """Open with :meth:`create` (new or resumed) or :meth:`open` (existing)."""

    def __init__(self, uri: str, group: zarr.Group, storage_options: dict[str, Any] | None):
        self.uri = str(uri)
        self.group = group
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = to_fs(self.uri, self.storage_options)
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{self.uri!r} is not a protonmf feature store")
        self.key: str = attrs["key"]
        self.grid: tuple[int, int] = tuple(attrs["grid"])
        self.dim: int = int(attrs["dim"])
        self.class_names: list[str] = list(attrs["class_names"])
        self.chunk_images: int = int(attrs["chunk_images"])
        self.meta: dict[str, Any] = dict(attrs.get("meta", {}))

    # ------------------------------------------------------------------ open
    @classmethod
    def create(
        cls,
        uri: str,
        *,
        key: str,
        class_names: Sequence[str],
        grid: tuple[int, int],
        dim: int,
        V: torch.Tensor,
        bias: torch.Tensor,
        meta: dict[str, Any] | None = None,
        chunk_images: int = 256,
        storage_options: dict[str, Any] | None = None,
    ) -> "FeatureStore":
        """Create a store, or reopen one made with the same ``key`` (a rerun resumes)."""
        if V.shape != (len(class_names), dim):
            raise ValueError(f"head V has shape {tuple(V.shape)}, expected ({len(class_names)}, {dim})")
        fs, root = to_fs(uri, storage_options)
        if fs.exists(join(root, "zarr.json")):
            store = cls.open(uri, storage_options=storage_options)
            if store.key != key:
                raise StoreError(
                    f"the feature store at {uri!r} was made with other settings (key {store.key[:12]}…, "
                    f"this run {key[:12]}…); use another storage.features location or delete it"
                )
            return store
        attrs = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "key": key,
            "grid": list(grid),
            "dim": int(dim),
            "class_names": list(class_names),
            "chunk_images": int(chunk_images),
            "meta": meta or {},
        }
        # The head goes in before the group's zarr.json: a store that exists has its head.
        write_bytes_atomic(fs, join(root, "head.safetensors"), save_safetensors(
            {"V": V.detach().float().cpu().contiguous(), "bias": bias.detach().float().cpu().contiguous()}
        ))
        group = zarr.open_group(str(uri), mode="a", storage_options=_zarr_options(uri, storage_options), attributes=attrs)
        return cls(uri, group, storage_options)

    @classmethod
    def open(cls, uri: str, *, storage_options: dict[str, Any] | None = None) -> "FeatureStore":
        # Zarr v3 named, with no consolidated metadata: opening reads the group's zarr.json alone
        # (2 requests on S3), instead of probing for Zarr v2's files first (9): a worker opens the
        # store once per task.
        try:
            group = zarr.open_group(str(uri), mode="r+", zarr_format=3, use_consolidated=False,
                                    storage_options=_zarr_options(uri, storage_options))
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            raise StoreError(f"no feature store at {uri!r}") from None
        return cls(uri, group, storage_options)

    # ------------------------------------------------------------------ classes
    def marker_path(self, k: int) -> str:
        """Where class k's completion marker is (written last, see the module's docstring)."""
        return join(self.root, "done", f"{class_stem(k)}.json")

    def _array_objects(self, k: int, data: np.ndarray, chunks: tuple[int, int, int]) -> dict[str, bytes]:
        """Class k's array as Zarr writes it (its ``zarr.json`` and chunks, path → bytes), encoded
        in memory: written by :meth:`write_class` with one PUT each, all at once, instead of by
        Zarr, which first asks whether an array is there (a request per class on S3). A class
        extracted again has the same images (see :mod:`protonmf.data.extract`), so the same keys
        are written again; a chunk key its marker does not count is never read."""
        encoded: dict[str, Any] = {}
        zarr.create_array(MemoryStore(encoded), data=data, chunks=chunks, zarr_format=3)
        return {join(self.root, class_stem(k), key): buf.to_bytes() for key, buf in encoded.items()}

    def is_done(self, k: int) -> bool:
        return self.fs.exists(self.marker_path(k))

    def done_classes(self) -> list[int]:
        done_dir = join(self.root, "done")
        if not self.fs.exists(done_dir):
            return []
        names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(done_dir, detail=False)]
        return sorted(int(n[1:6]) for n in names if n.startswith("c") and n.endswith(".json"))

    def made_from(self) -> dict[int, dict[str, Any]]:
        """What each complete class was made from, by class: its marker's ``images_sha256`` (None
        for a marker written before it was kept, or not valid JSON), ``n_images`` and
        ``n_skipped``: one LIST of the markers, then the markers read at once (no chunk)."""
        def entry(k: int) -> dict[str, Any]:
            marker = self.read_marker(k) or {}
            return {"images_sha256": marker.get("images_sha256"), "n_images": int(marker.get("n_images", 0)),
                    "n_skipped": int(marker.get("n_skipped", 0))}

        ks = self.done_classes()
        return dict(zip(ks, concurrently(entry, ks)))

    def retract(self, ks: Sequence[int]) -> None:
        """Remove the markers of ``ks`` (classes about to be extracted again from other images):
        until a class is written again it is not complete, and no reader takes its old features
        for the new ones."""
        paths = [self.marker_path(k) for k in ks]
        if paths:
            self.fs.rm(paths)

    def write_class(self, k: int, features: torch.Tensor | np.ndarray, records: pa.Table,
                    images_sha256: str | None = None) -> None:
        """Write class k's features (n, h, w, D) or (n, h·w, D), its records, then its marker
        (with ``images_sha256``, what the class was made from)."""
        if not 0 <= k < len(self.class_names):
            raise ValueError(f"class index {k} is not in [0, {len(self.class_names)})")
        F = torch.as_tensor(features)
        if F.ndim == 4:
            F = F.flatten(1, 2)
        h, w = self.grid
        if F.ndim != 3 or F.shape[1:] != (h * w, self.dim):
            raise ValueError(f"features of class {k} have shape {tuple(F.shape)}, expected (n, {h * w}, {self.dim})")
        if not torch.isfinite(F).all():
            raise ValueError(f"features of class {k} contain NaN or Inf values")
        records = records.cast(RECORD_SCHEMA)
        used = int(pc.sum(pc.is_valid(records["row"])).as_py() or 0)
        if used != F.shape[0]:
            raise ValueError(f"class {k}: {F.shape[0]} feature rows but {used} records with a row")
        data = F.to(torch.float16).cpu().numpy()
        rows = max(1, min(self.chunk_images, data.shape[0]))
        table = parquet_bytes(records)
        array = self._array_objects(k, data, (rows, h * w, self.dim))
        write_objects(self.fs, {**array, self._table(k): table})
        marker = {"class": k, "name": self.class_names[k], "n_images": int(F.shape[0]),
                  "n_skipped": records.num_rows - used, "key": self.key, "chunk_images": rows,
                  "features_sha256": _chunk_digests(data, rows), "records_sha256": sha256(table),
                  "array": json.loads(array[join(self.root, class_stem(k), "zarr.json")]),
                  "images_sha256": images_sha256}
        write_bytes_atomic(self.fs, self.marker_path(k), json.dumps(marker).encode())

    def read_class(self, k: int, made_from: str | None = None) -> torch.Tensor:
        """Class k's features, (n, h·w, D) float16, in one read of its chunks, checked against its
        marker (its marker and its chunks: the record table is not read).

        Raises :class:`StoreError` if the class is not complete or is damaged, or, given
        ``made_from``, if its marker says it was made from other images (``images_sha256``).
        """
        return self._read_or_raise(k, records=False, made_from=made_from)[0]

    def read_class_with_records(self, k: int, made_from: str | None = None) -> tuple[torch.Tensor, pa.Table]:
        """:meth:`read_class` and class k's record table, checked against the marker too."""
        features, table = self._read_or_raise(k, records=True, made_from=made_from)
        return features, parquet_table(table)

    def read_classes(self, ks: Sequence[int], made_from: Sequence[str] | None = None) -> list[torch.Tensor]:
        """:meth:`read_class` of each class of ``ks``, in that order, several classes at once (see
        :meth:`read_classes_with_records`)."""
        return concurrently(lambda i: self.read_class(ks[i], made_from and made_from[i]), range(len(ks)))

    def read_classes_with_records(self, ks: Sequence[int],
                                  made_from: Sequence[str] | None = None) -> list[tuple[torch.Tensor, pa.Table]]:
        """:meth:`read_class_with_records` of each class of ``ks``, in that order, several classes
        at once: a class is its marker (with the array's metadata), then its chunks and its record
        table, each checked as :meth:`read_class` checks it. The first class of ``ks`` that is not
        complete or is damaged raises its :class:`StoreError`."""
        return concurrently(lambda i: self.read_class_with_records(ks[i], made_from and made_from[i]), range(len(ks)))

    def _read_or_raise(self, k: int, *, records: bool, made_from: str | None = None) -> tuple[torch.Tensor, bytes | None]:
        features, table, damage, done = self._read_checked(k, records=records, made_from=made_from)
        if not done:
            raise StoreError(f"class {k} ({self.class_names[k]!r}) is not complete in the store at {self.uri!r}")
        if damage is not None:
            raise self.damaged(k, damage)
        return torch.from_numpy(features), table

    def check_class(self, k: int) -> str | None:
        """What is wrong with complete class k, or None if it reads back as written (reads all of it)."""
        return self._read_checked(k)[2]

    def verify_class(self, k: int) -> tuple[bool, str | None]:
        """(whether class k is complete: it has a marker, what is wrong with it or None), reading
        its marker once: :meth:`is_done` then :meth:`check_class` without the first's request."""
        _, _, damage, done = self._read_checked(k)
        return done, damage if done else None

    def read_marker(self, k: int) -> dict[str, Any] | None:
        """Class k's completion marker; None if there is none or it is not valid JSON."""
        return self._load_marker(k)[1]

    def _load_marker(self, k: int) -> tuple[bool, dict[str, Any] | None]:
        """(whether class k has a marker, the marker or None if it is not valid JSON), in one read:
        the marker is read where it is checked, not looked up first (a request each on S3)."""
        try:
            data = read_bytes(self.fs, self.marker_path(k))
        except FileNotFoundError:
            return False, None
        try:
            return True, json.loads(data)
        except ValueError:
            return True, None

    def damaged(self, k: int, damage: str) -> StoreError:
        """The error that reports class k as damaged (``damage`` says what is wrong)."""
        return StoreError(f"class {k} ({self.class_names[k]!r}) of the feature store at {self.uri!r} is damaged: {damage}")

    def _table(self, k: int) -> str:
        return join(self.root, "tables", f"{class_stem(k)}.parquet")

    def _read_checked(self, k: int, *, records: bool = True,
                      made_from: str | None = None) -> tuple[np.ndarray | None, bytes | None, str | None, bool]:
        """Class k's features, its record table (Parquet bytes; None, unread, unless ``records``),
        what is wrong with what was read (None if nothing), and whether it has a marker.

        I/O errors propagate (the network may heal, and the class is not damaged by them); what
        does not decode or does not match the marker is damage.
        """
        done, marker = self._load_marker(k)
        if not done:
            return None, None, f"it has no completion marker done/{class_stem(k)}.json", False
        damage = _marker_damage(k, marker)
        if damage is not None:
            return None, None, damage, True
        if made_from is not None and marker.get("images_sha256") != made_from:
            return None, None, "it was extracted from other images than the data holds now (extract it again)", True
        try:
            array = self._open_array(k, marker)
        except OSError:
            raise
        except Exception as err:  # noqa: BLE001 - KeyError (gone) or unreadable metadata: both damage
            return None, None, f"its array {class_stem(k)}/ cannot be opened ({type(err).__name__}: {err})", True
        h, w = self.grid
        n, rows, digests = int(marker["n_images"]), int(marker["chunk_images"]), marker["features_sha256"]
        if tuple(array.shape) != (n, h * w, self.dim):
            return None, None, f"its array has shape {tuple(array.shape)}, its marker says {(n, h * w, self.dim)}", True
        if len(digests) != math.ceil(n / rows):
            return None, None, f"its marker lists {len(digests)} chunk checksums for {n} images in chunks of {rows}", True
        try:
            data = np.asarray(array[...])
        except OSError:
            raise
        except Exception:  # noqa: BLE001 - a chunk does not decode: found and named below
            data = None
        problems = []
        for i, start in enumerate(range(0, n, rows)):
            what = f"chunk {i} (images {start}–{min(start + rows, n) - 1})"
            try:
                block = data[start:start + rows] if data is not None else np.asarray(array[start:start + rows])
            except OSError:
                raise
            except Exception as err:  # noqa: BLE001 - garbage bytes fail with the codec's own error type
                problems.append(f"{what} cannot be decoded ({type(err).__name__}: {err})")
                continue
            if _chunk_digests(block, rows)[0] != digests[i]:
                lost = not self.fs.exists(join(self.root, class_stem(k), array.metadata.encode_chunk_key((i, 0, 0))))
                problems.append(f"{what} is missing (Zarr reads it as zeros)" if lost else f"{what} does not match its sha256")
        if problems:
            return None, None, "; ".join(problems), True
        if not records:
            return data, None, None, True
        table, damage = self._read_table(k, marker)
        return (data, table, None, True) if damage is None else (None, None, damage, True)

    def _open_array(self, k: int, marker: dict[str, Any]) -> zarr.Array:
        """Class k's array: from the copy of its metadata in the marker with its chunks read into
        memory (several at once; a lost one is left out, and Zarr reads it as zeros, which the
        checksums catch; other errors are raised), or, for a marker without the copy, opened where
        it is stored."""
        if "array" not in marker:
            return self.group[class_stem(k)]
        as_buffer = default_buffer_prototype().buffer.from_bytes
        encoded: dict[str, Any] = {"zarr.json": as_buffer(json.dumps(marker["array"]).encode())}
        array = zarr.open_array(MemoryStore(encoded), mode="r", zarr_format=3)
        folder = join(self.root, class_stem(k))
        paths = {join(folder, key): key for key in map(array.metadata.encode_chunk_key, np.ndindex(*array.cdata_shape))}
        for path, data in (self.fs.cat(list(paths), on_error="return") if paths else {}).items():  # none: no images
            if isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, BaseException):  # I/O errors propagate: the network may heal
                raise data
            encoded[paths[path]] = as_buffer(data)
        return array

    def _read_table(self, k: int, marker: dict[str, Any]) -> tuple[bytes | None, str | None]:
        """Class k's record table (Parquet bytes) and what is wrong with it (None if nothing)."""
        try:
            data = read_bytes(self.fs, self._table(k))
        except FileNotFoundError:
            return None, f"its record table tables/{class_stem(k)}.parquet is missing"
        if sha256(data) != marker["records_sha256"]:
            return None, f"its record table tables/{class_stem(k)}.parquet does not match its sha256"
        return data, None

    def read_records(self, classes: Sequence[int] | None = None) -> pa.Table:
        """The records of the given (default: all completed) classes, as one table, each checked against its marker."""
        ks = self.done_classes() if classes is None else list(classes)
        tables = []
        for k in ks:
            done, marker = self._load_marker(k)
            if not done:
                raise StoreError(f"class {k} is not complete in the store at {self.uri!r}")
            damage = _marker_damage(k, marker)
            data, damage = (None, damage) if damage is not None else self._read_table(k, marker)
            if damage is not None:
                raise self.damaged(k, damage)
            tables.append(parquet_table(data))
        return pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The black box's head (V (K, D), bias (K,)) stored with the features."""
        tensors = load_safetensors(read_bytes(self.fs, join(self.root, "head.safetensors")))
        return tensors["V"], tensors["bias"]
