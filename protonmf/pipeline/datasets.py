"""The images of a run: each split listed once into a dataset index, and sources built from it.

:func:`index_data` (the run's prepare step) lists every split of ``data`` once and writes its
index (:mod:`protonmf.data.index`) under ``<storage.features>/index/``; the config it returns
names those files (``data.train_index``, ``data.val_index``). :func:`make_split_source` then builds
a split's source from its index, reading only the rows of the classes asked for, so extraction
workers, CRAFT tasks and the evaluation never list the data.

Index files are named by what was listed: an ImageFolder or CUB index by a hash of its rows (the
tree is listed on every run, one LIST pass, and an unchanged tree finds its index there), a shard
index by a hash of the shards' names, sizes and versions (ETags, mtimes) and ``classes.txt``, so
unchanged shards are not read again and changed ones are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from protonmf.config import Config
from protonmf.data import ImageSource, make_source
from protonmf.data.decode import ReadRetry
from protonmf.data.sources import IN_MEMORY_KINDS
from protonmf.data.index import class_digests, class_sizes, index_table, open_index, read_index, write_index
from protonmf.data.sources.relabel import relabel_by_name
from protonmf.data.sources.base import open_fs
from protonmf.data.sources.shards import fingerprint, list_shards, read_classes_txt, shard_folder
from protonmf.storage import join, to_fs

__all__ = ["class_images_sha256", "images_per_class", "in_memory", "index_data", "list_split", "make_split_source"]

SHARDED = {"parquet": ".parquet", "webdataset": ".tar"}


def in_memory(config: Config) -> bool:
    """Whether the run's images are made in memory (synthetic, digits): nothing to list or index."""
    return config.data.source in IN_MEMORY_KINDS


def _root(config: Config, split: str) -> str:
    root = config.data.train if split == "train" else config.data.val
    if root is None:
        raise ValueError(f"data.{split}: no location given for source {config.data.source!r}")
    return root


def _limit(config: Config, split: str) -> int | None:
    return config.data.max_images_per_class if split == "train" else config.data.val_images_per_class


def list_split(config: Config, split: str, **kwargs: Any) -> ImageSource:
    """List a split of the data (the expensive way: the whole tree or every shard).

    A held-out split lists its own classes (its folders, or its shards' names); they are matched
    to the training classes by name in :func:`make_split_source`.
    """
    data = config.data
    name = f"data.{split}"
    limit = _limit(config, split)
    if data.source in ("synthetic", "shapes"):
        return make_source(
            data.source, name=name, n_classes=data.n_classes, n_per_class=limit or 60,
            split=split, image_size=data.preprocess.crop, seed=data.seed,
        )
    if data.source == "digits":
        return make_source("digits", name=name, split=split, image_size=data.preprocess.crop, seed=data.seed)
    root = _root(config, split)
    opts = config.storage.options
    if data.source == "cub":
        return make_source("cub", name=name, root=root, split="train" if split == "train" else "test", storage_options=opts)
    classes = data.classes if split == "train" or data.source in SHARDED else None
    source = make_source(data.source, name=name, root=root, classes=classes, max_images_per_class=limit,
                         storage_options=opts, **kwargs)
    empty = getattr(source, "empty_folders", [])  # checked where the data is listed: index-built sources cannot tell
    if empty:
        raise ValueError(f"{name}: {len(empty)} class folder(s) under {source.root} hold no image: {', '.join(empty[:20])}")
    return source


def index_data(config: Config) -> Config:
    """List each split once, write its index beside the feature store, and return the config with
    ``data.train_index`` (and ``data.val_index`` when ``data.val`` is set) naming the files.

    Sources held in memory (synthetic, digits) have nothing to list: the config is returned as is.
    """
    data = config.data
    if in_memory(config):
        return config
    folder = join(config.storage.features, "index")
    pinned = {"train_index": _index_split(config, "train", folder)}
    if data.val:
        pinned["val_index"] = _index_split(config, "val", folder)
    return config.model_copy(update={"data": data.model_copy(update=pinned)})


def _index_split(config: Config, split: str, folder: str) -> str:
    opts = config.storage.options
    if config.data.source not in SHARDED:
        return write_index(index_table(list_split(config, split), split), folder, storage_options=opts)
    root = _root(config, split)
    fs, path, _ = open_fs(root, opts)
    shards = list_shards(fs, root, path, SHARDED[config.data.source])
    key = fingerprint(shards, kind=config.data.source, split=split, limit=_limit(config, split),
                      classes=config.data.classes, classes_txt=read_classes_txt(fs, shard_folder(path)))
    uri = join(folder, f"{split}-{key[:16]}.parquet")
    fs_index, index_path = to_fs(uri, opts)
    if fs_index.exists(index_path):  # the same shards, listed by an earlier run
        return uri
    return write_index(index_table(list_split(config, split, shards=shards), split), folder, storage_options=opts,
                       name=uri.rsplit("/", 1)[-1])


def _training_classes(config: Config) -> list[str]:
    """The training classes in label order: ``data.classes``, else the training index's, else a listing."""
    if config.data.classes is not None:
        return list(config.data.classes)
    if config.data.train_index:
        return list(read_index(config.data.train_index, labels=[], storage_options=config.storage.options)[1]["classes"])
    return list(list_split(config, "train").classes)


def make_split_source(
    config: Config, split: str, *, labels: Sequence[int] | None = None, classes: Sequence[str] | None = None,
) -> ImageSource:
    """The training ("train") or held-out ("val") images of the run.

    From the split's index when the run's prepare step wrote one (no listing), else listed.
    ``labels``: only the records of these classes are read (every class is still in ``classes``).
    Held-out images are labelled by class name against ``classes`` (default: the training
    classes); a held-out class not among them follows ``data.unknown_val_classes``.
    """
    opts = config.storage.options
    index = config.data.train_index if split == "train" else config.data.val_index
    if split == "train" or in_memory(config):
        if index:
            return _reading(config, open_index(index, labels=labels, storage_options=opts))
        source = _reading(config, list_split(config, split))
        return source if labels is None else _only(source, labels)
    reference = list(classes) if classes is not None else _training_classes(config)
    if index:
        own = read_index(index, labels=[], storage_options=opts)[1]["classes"]
        wanted = None if labels is None else [i for i, n in enumerate(own) if n in {reference[k] for k in labels}]
        source = open_index(index, labels=wanted, storage_options=opts)
    else:
        source = list_split(config, split)
    return relabel_by_name(_reading(config, source), reference, unknown=config.data.unknown_val_classes, what="data.val")


def _reading(config: Config, source: ImageSource) -> ImageSource:
    """``source`` reading its images with the run's retries (``storage.read_attempts``, ``storage.read_backoff``)."""
    s = config.storage
    source.read_retry = ReadRetry(attempts=s.read_attempts, backoff=s.read_backoff)
    return source


def _only(source: ImageSource, labels: Sequence[int]) -> ImageSource:
    wanted = set(int(k) for k in labels)
    source.records = [r for r in source.records if r.label in wanted]
    source.__dict__.pop("_by_label", None)
    return source


def images_per_class(config: Config) -> list[int]:
    """How many training images each class has, in label order: from the dataset index when the
    run's prepare step wrote one (its label column alone), else from the source's records."""
    if config.data.train_index:
        return class_sizes(config.data.train_index, storage_options=config.storage.options)
    source = make_split_source(config, "train")
    return np.bincount(np.array([r.label for r in source.records], dtype=np.int64), minlength=len(source.classes)).tolist()


def class_images_sha256(config: Config) -> list[str]:
    """What each training class is made from now (:func:`~protonmf.data.records.images_sha256`), in
    label order: from the dataset index's footer when the run's prepare step wrote one (no row
    read), else from the source's records."""
    if config.data.train_index:
        info = read_index(config.data.train_index, labels=[], storage_options=config.storage.options)[1]
        if "images_sha256" in info:
            return list(info["images_sha256"])
    source = make_split_source(config, "train")
    return class_digests(source.records, len(source.classes))
