"""``root/<class>/<image>`` on any fsspec URI (a local path, ``file://``, ``s3://``, ``gs://``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from protonmf.data.decode import load_image, describe_error
from protonmf.data.records import Record
from protonmf.data.sources.base import ImageSource
from protonmf.storage import concurrently

#: File name endings (compared in lower case) that :class:`ImageFolderSource` takes as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def _version(info: dict[str, Any]) -> str | None:
    """What a listing says of a file's bytes: its ETag on object storage, else its size and mtime."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return f"{info.get('size')}:{mtime}" if mtime is not None or info.get("size") is not None else None


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _check_names(value: Any, what: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{what} must be a list of class names, got {value!r}")
    names = [str(v) for v in value]
    if not names:
        raise ValueError(f"{what} is empty")
    dupes = sorted(n for n, k in Counter(names).items() if k > 1)
    if dupes:
        raise ValueError(f"{what} has duplicate names: {', '.join(dupes)}")
    return names


class ImageFolderSource(ImageSource):
    """Images laid out as ``root/<class>/<image>`` (ImageNet train style), on any fsspec URI.

    The tree is listed once: the root, then every class folder at once (``fs.find`` of each
    prefix: on S3 a paginated ``ListObjectsV2`` per class, not one request per file), keeping
    what the listing says of each file (:attr:`Record.version`: its ETag, or size and mtime). A file is an image if its name
    ends with one of :data:`IMAGE_EXTENSIONS` (any case); files and folders whose name starts
    with ``.`` are ignored; files below a class folder's sub-folders belong to that class (as in
    torchvision's ``ImageFolder``). Whether a file really is an image is found out when it is
    loaded.

    Parameters
    ----------
    root : str, local path or URI of the folder holding the class folders.
    classes : list of str or None. None: the sorted names of the folders that hold images. Given
        (e.g. the 1000 ImageNet wnids in logit order): label i is ``classes[i]``; folders not in
        it are ignored (see ``unlisted_folders``); a used class without images is a ValueError.
    max_images_per_class : int or None, keep the first n images (in sorted order) of each class.
    class_subset : list of str or None, keep only these classes; labels stay indices into the
        full ``classes`` list.
    storage_options : dict or None, passed to fsspec (e.g. ``{"anon": True}``).

    Attributes
    ----------
    classes, records : see :class:`ImageSource`; records are sorted by (label, path).
    fs, path : the filesystem and the root's path inside it.
    unlisted_folders : folders with images that are not in a given ``classes`` list.
    empty_folders : folders under ``root`` without any image (not classes here; the pipeline
        refuses them before extraction).

    Raises
    ------
    ValueError
        Nothing found under ``root`` ("no images found under ..."), ``root`` does not exist, a
        used class has no images, a ``class_subset`` name is not a class, or a bad argument.
    """

    def __init__(
        self,
        root: str,
        *,
        classes: Sequence[str] | None = None,
        max_images_per_class: int | None = None,
        class_subset: Sequence[str] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if max_images_per_class is not None and (
            isinstance(max_images_per_class, bool) or not isinstance(max_images_per_class, (int, np.integer))
            or max_images_per_class < 1
        ):
            raise ValueError(f"max_images_per_class must be a positive integer or None, got {max_images_per_class!r}")
        given = None if classes is None else _check_names(classes, "classes")
        subset = None if class_subset is None else _check_names(class_subset, "class_subset")

        self._open(root, storage_options)
        by_class, n_other = self._list()
        self._check_found(by_class, n_other)
        self.empty_folders = self._empty_folders(by_class)
        if given is None:
            self.classes = sorted(by_class)
            self.unlisted_folders: list[str] = []
        else:
            self.classes = given
            self.unlisted_folders = sorted(set(by_class) - set(given))
        used = self._used_classes(subset, given is not None, by_class)
        self.class_subset = None if subset is None else used
        self.records = self._records(used, by_class, max_images_per_class)
        self.max_images_per_class = max_images_per_class

    def _empty_folders(self, by_class: dict[str, dict[str, str | None]]) -> list[str]:
        """Folders under the root that hold no image (a class whose images went missing, on a disk;
        object stores have no empty folders, only prefixes with other files)."""
        names = [f.rsplit("/", 1)[-1] for f in self._folders]
        return sorted(n for n in names if n not in by_class and not n.startswith("."))

    def _open(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self._open_root(root, storage_options)

    def index_settings(self) -> dict[str, Any]:
        return {"root": self.root}

    def _check_found(self, by_class: dict[str, dict[str, str | None]], n_other: int) -> None:
        """Nothing found under the root is an error that says what was looked for."""
        if by_class:
            return
        if not self._exists():
            raise ValueError(f"no images found under {self.root}: it does not exist")
        other = f"found {n_other} other file(s); " if n_other else ""
        raise ValueError(
            f"no images found under {self.root} ({other}checked {self.root}/<class>/<image> "
            f"for extensions {', '.join(IMAGE_EXTENSIONS)}, any case)"
        )

    def _used_classes(self, subset: list[str] | None, given: bool, by_class: dict[str, dict[str, str | None]]) -> list[str]:
        """The classes whose images are used (all, or ``class_subset`` in label order); each must have images."""
        index = {name: i for i, name in enumerate(self.classes)}
        if subset is not None:
            unknown = [n for n in subset if n not in index]
            if unknown:
                where = "the given classes list" if given else f"the class folders under {self.root}"
                raise ValueError(f"class_subset names {len(unknown)} class(es) not in {where}: {', '.join(unknown[:20])}")
            used = sorted(subset, key=index.__getitem__)
        else:
            used = list(self.classes)
        missing = [n for n in used if n not in by_class]
        if missing:
            more = f" (and {len(missing) - 20} more)" if len(missing) > 20 else ""
            raise ValueError(
                f"{len(missing)} class(es) have no folder with images under {self.root}: "
                f"{', '.join(missing[:20])}{more}"
            )
        return used

    def _records(self, used: list[str], by_class: dict[str, dict[str, str | None]], limit: int | None) -> list[Record]:
        index = {name: i for i, name in enumerate(self.classes)}
        records: list[Record] = []
        for name in used:
            rels = sorted(by_class[name])
            if limit is not None:
                rels = rels[: int(limit)]
            records.extend(Record(image_id=rel, uri=self._uri(rel), label=index[name], version=by_class[name][rel])
                           for rel in rels)
        return records

    def _list(self) -> tuple[dict[str, dict[str, str | None]], int]:
        """{class folder: {relative path of an image: its version}}, and the number of other files.

        The root is listed, then every class folder below it at once (one LIST stream per class
        prefix on object storage, :data:`~protonmf.storage.IN_FLIGHT` at a time: ImageNet's 1,000
        prefixes in the time of a few, where one recursive listing pages through 1.28M keys one
        page after another)."""
        try:
            self.fs.invalidate_cache(self.path)
        except Exception:  # pragma: no cover - a filesystem without a cache
            pass
        try:
            top = self.fs.ls(self.path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            top = []
        except Exception as err:
            raise ValueError(f"cannot list {self.root}: {describe_error(err)}") from err
        prefix = self.path.rstrip("/") + "/"
        folders = self._folders = [e["name"].rstrip("/") for e in top if e.get("type") == "directory"]
        n_other = sum(e.get("type") != "directory" for e in top)

        def find(folder: str) -> dict[str, dict[str, Any]]:
            try:
                return self.fs.find(folder, detail=True)
            except FileNotFoundError:
                return {}
            except Exception as err:
                raise ValueError(f"cannot list {self.root}: {describe_error(err)}") from err

        by_class: dict[str, dict[str, str | None]] = {}
        for found in concurrently(find, [f for f in folders if not _hidden(f.rsplit("/", 1)[-1])]):
            for p, info in found.items():
                p = str(p)
                if not p.startswith(prefix) or info.get("type", "file") != "file":
                    continue
                rel = p[len(prefix):]
                parts = rel.split("/")
                if len(parts) < 2 or any(_hidden(part) or not part for part in parts) \
                        or not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
                    n_other += 1
                    continue
                by_class.setdefault(parts[0], {})[rel] = _version(info)
        return by_class, n_other

    def _exists(self) -> bool:
        try:
            return bool(self.fs.exists(self.path))
        except Exception:
            return False

    def _uri(self, rel: str) -> str:
        full = f"{self.path.rstrip('/')}/{rel}"
        return full if self._local else self.fs.unstrip_protocol(full)

    def load(self, record: Record) -> tuple[Image.Image | None, str | None]:
        return load_image(record.uri, self.fs, self.read_retry)

    def _describe(self) -> str:
        return repr(self.root)


