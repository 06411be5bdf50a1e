"""What the sharded sources (Parquet, WebDataset) share: :class:`ShardSource` (arguments, opening,
finding the shards), naming the classes, and turning (shard, label) rows into records.

A shard source's ``root`` is a folder (every shard below it, in sorted order) or a glob pattern
(``s3://bucket/imagenet-1k/data/train-*.parquet``). Labels in shards are integers; their names
come from, in this order: the ``classes`` argument (``data.classes``: label i is ``classes[i]``),
a ``classes.txt`` beside the shards (line i is the name of label i), or the shards' own metadata
(Hugging Face's ``ClassLabel`` names, Parquet only). Without any of them the source refuses to
guess.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from protonmf.data.decode import describe_error
from protonmf.data.records import Record
from protonmf.data.sources.base import ImageSource
from protonmf.data.sources.imagefolder import _check_names

T = TypeVar("T")

#: Shards read at once while listing (reads of object storage wait on the network, not the CPU).
LIST_THREADS = 16

_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Shard:
    """One shard file: its path in the filesystem, size, and a version tag (ETag or mtime)."""

    path: str
    size: int
    version: str


def _is_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)


def shard_folder(path: str) -> str:
    """The folder of ``path``'s shards: ``path`` itself, or the part of a glob before its first wildcard."""
    if not _is_glob(path):
        return path.rstrip("/")
    parts = path.split("/")
    fixed = []
    for part in parts:
        if _is_glob(part):
            break
        fixed.append(part)
    return "/".join(fixed)


def list_shards(fs: Any, root: str, path: str, suffix: str) -> list[Shard]:
    """Every file ending with ``suffix`` below the folder ``path`` or matching the glob ``path``,
    sorted by path: one listing (a paginated LIST on object storage)."""
    try:
        fs.invalidate_cache()
    except Exception:  # pragma: no cover - a filesystem without a cache
        pass
    try:
        found = fs.glob(path, detail=True) if _is_glob(path) else fs.find(path, detail=True)
    except FileNotFoundError:
        found = {}
    except Exception as err:
        raise ValueError(f"cannot list {root}: {describe_error(err)}") from err
    shards = [
        Shard(str(p), int(info.get("size") or 0), str(info.get("ETag") or info.get("etag") or info.get("mtime") or ""))
        for p, info in sorted(found.items())
        if info.get("type", "file") == "file" and str(p).lower().endswith(suffix) and not str(p).rsplit("/", 1)[-1].startswith(".")
    ]
    if not shards:
        raise ValueError(f"no {suffix} shards found under {root}")
    return shards


def fingerprint(shards: Sequence[Shard], **settings: Any) -> str:
    """A hash of the shards (paths, sizes, versions) and the settings: the same shards list the same."""
    text = json.dumps({"shards": [(s.path, s.size, s.version) for s in shards], **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_classes_txt(fs: Any, folder: str) -> list[str] | None:
    """The names in ``<folder>/classes.txt`` (one per line, blank lines ignored), or None if there is none."""
    try:
        text = fs.cat_file(f"{folder}/classes.txt").decode("utf-8")
    except FileNotFoundError:
        return None
    except Exception as err:
        raise ValueError(f"cannot read {folder}/classes.txt: {describe_error(err)}") from err
    names = [line.strip() for line in text.splitlines() if line.strip()]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{folder}/classes.txt has duplicate names: {', '.join(dupes[:20])}")
    return names


def no_class_names(root: str, extra: str = "") -> ValueError:
    return ValueError(
        f"no class names for the labels of {root}: give data.classes (label i is classes[i]) or put a "
        f"classes.txt beside the shards (line i names label i){extra}"
    )


def in_threads(fn: Callable[[T], Any], items: Iterable[T]) -> list[Any]:
    """``fn`` over ``items`` on :data:`LIST_THREADS` threads, results in order."""
    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(LIST_THREADS, len(items)), thread_name_prefix="protonmf-list") as pool:
        return list(pool.map(fn, items))


def full_uri(fs: Any, path: str, local: bool) -> str:
    return path if local else fs.unstrip_protocol(path)


def check_labels(labels: Iterable[int], n_classes: int, where: Callable[[int], str]) -> None:
    """Every label indexes a class; the first that does not is named with ``where(i)``."""
    for i, label in enumerate(labels):
        if not 0 <= label < n_classes:
            raise ValueError(f"{where(i)}: label {label} is not in [0, {n_classes}) (the class names give {n_classes} classes)")


def keep_first(labels: Sequence[int], limit: int | None) -> list[int]:
    """Positions to keep: all, or the first ``limit`` of each label (in the given order)."""
    if limit is None:
        return list(range(len(labels)))
    seen: dict[int, int] = {}
    keep = []
    for i, label in enumerate(labels):
        if seen.get(label, 0) < limit:
            seen[label] = seen.get(label, 0) + 1
            keep.append(i)
    return keep


def check_limit(max_images_per_class: Any) -> int | None:
    if max_images_per_class is None:
        return None
    if isinstance(max_images_per_class, bool) or not isinstance(max_images_per_class, int) or max_images_per_class < 1:
        raise ValueError(f"max_images_per_class must be a positive integer or None, got {max_images_per_class!r}")
    return int(max_images_per_class)


class ShardSource(ImageSource):
    """A source of shard files ending with :attr:`SUFFIX` under ``root`` (see the subclasses for the
    arguments): the constructor checks them, opens ``root``, finds the shards (or takes ``shards``)
    and lists the class names and records with :meth:`_list_records`."""

    SUFFIX: str

    def __init__(
        self,
        root: str,
        *,
        classes: Sequence[str] | None = None,
        max_images_per_class: int | None = None,
        storage_options: dict[str, Any] | None = None,
        shards: Sequence[Shard] | None = None,
    ) -> None:
        limit = check_limit(max_images_per_class)
        given = None if classes is None else _check_names(classes, "classes")
        self._open(root, storage_options)
        self.shards = list(shards) if shards is not None else list_shards(self.fs, self.root, self.path, self.SUFFIX)
        self.classes, self.records = self._list_records(given, limit)
        if not self.records:
            raise ValueError(f"no images found in the shards under {self.root}")

    def _list_records(self, given: list[str] | None, limit: int | None) -> tuple[list[str], list[Record]]:
        """(class names, records) of :attr:`shards`: the names ``given``, or found beside or in the
        shards; the first ``limit`` images of each class, or all."""
        raise NotImplementedError

    def _open(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self._open_root(root, storage_options)

    def index_settings(self) -> dict[str, Any]:
        return {"root": self.root}
