"""WebDataset tar shards: per sample an image member (``<key>.jpg``, ``.png``, ...) and a
``<key>.cls`` member holding its integer label as text.

As in WebDataset, a member's key is its path up to the first ``.`` of its file name and the rest
is its extension. Class names: see :mod:`protonmf.data.sources.shards` (``data.classes`` or a
``classes.txt`` beside the shards).
"""

from __future__ import annotations

import tarfile

from PIL import Image

from protonmf.data.decode import decode_image, describe_error
from protonmf.data.records import Record
from protonmf.data.sources.imagefolder import IMAGE_EXTENSIONS
from protonmf.data.sources.shards import (
    Shard, ShardSource, check_labels, full_uri, in_threads, keep_first, no_class_names, read_classes_txt, shard_folder,
)

_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)

#: Bytes fetched per request while a shard is streamed through for its member headers.
_STREAM_BLOCK = 8 << 20


def _split_name(name: str) -> tuple[str, str]:
    """A member's (key, extension) as WebDataset splits them."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


class WebDatasetSource(ShardSource):
    """Images in WebDataset tar shards, with their labels in ``.cls`` members.

    Listing streams each shard once (on several threads) and keeps, per sample, where its image's
    bytes lie in the tar (``offset``, ``size``) and its label; :meth:`load` then reads exactly those
    bytes (one ranged read per image, as an ImageFolder reads one file), so a class's images are
    read wherever they lie in the shards. Records are in shard order, then member order;
    ``image_id`` is the sample's key and ``uri`` is ``<shard URI>#<member name>``.

    Parameters
    ----------
    root : a folder of ``*.tar`` shards or a glob pattern, local or any fsspec URI.
    classes : names of the labels (label i is ``classes[i]``) or None (then ``classes.txt``).
    max_images_per_class : keep the first n images (in shard, member order) of each class.
    storage_options : passed to fsspec.
    """

    SUFFIX = ".tar"

    def _list_records(self, given: list[str] | None, limit: int | None) -> tuple[list[str], list[Record]]:
        names = given or read_classes_txt(self.fs, shard_folder(self.path))
        if names is None:
            raise no_class_names(self.root)
        samples = [s for listed in in_threads(self._list_shard, self.shards) for s in listed]
        check_labels([s[4] for s in samples], len(names), lambda i: f"{samples[i][0]}: sample {samples[i][1]!r}")
        seen: dict[str, str] = {}
        for shard, key, *_ in samples:
            if key in seen:
                raise ValueError(f"sample key {key!r} is in {seen[key]} and in {shard}: keys must be unique")
            seen[key] = shard
        samples.sort(key=lambda s: s[4])  # by class; stable: shard and member order within a class
        keep = keep_first([s[4] for s in samples], limit)
        records = [
            Record(image_id=key, uri=f"{full_uri(self.fs, shard, self._local)}#{member}", label=label, offset=offset, nbytes=size)
            for shard, key, member, (offset, size), label in (samples[i] for i in keep)
        ]
        return names, records

    def _list_shard(self, shard: Shard) -> list[tuple[str, str, str, tuple[int, int], int]]:
        """(shard, key, image member, (offset, size), label) of every sample of one shard."""
        images: dict[str, tuple[str, int, int]] = {}
        labels: dict[str, int] = {}
        try:
            with self.fs.open(shard.path, "rb", block_size=_STREAM_BLOCK) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_name(member.name)
                    if ext == "cls":
                        text = tar.extractfile(member).read().decode("utf-8").strip()
                        try:
                            labels[key] = int(text)
                        except ValueError:
                            raise ValueError(f"{shard.path}: {member.name} holds {text[:40]!r}, not an integer label") from None
                    elif ext in _IMAGE_EXTS and key not in images:
                        images[key] = (member.name, member.offset_data, member.size)
        except ValueError:
            raise
        except Exception as err:
            raise ValueError(f"cannot read the shard {shard.path}: {describe_error(err)}") from err
        unlabelled = [k for k in images if k not in labels]
        if unlabelled:
            raise ValueError(f"{shard.path}: {len(unlabelled)} image(s) have no .cls label, e.g. {unlabelled[0]!r}")
        return [(shard.path, key, name, (offset, size), labels[key]) for key, (name, offset, size) in images.items()]

    def load(self, record: Record) -> tuple[Image.Image | None, str | None]:
        shard = record.uri.rsplit("#", 1)[0]
        if record.nbytes == 0:  # an empty member: nothing to read (an empty byte range is not one to S3)
            return decode_image(b"", record.uri)
        try:
            data = self.read_retry.read(record.uri, lambda: self.fs.cat_file(shard, start=record.offset,
                                                                             end=record.offset + record.nbytes))
        except FileNotFoundError as err:
            return None, f"missing file: {record.uri}: {describe_error(err)}"
        if len(data) != record.nbytes:
            return None, f"truncated image: {record.uri}: {len(data)} of {record.nbytes} bytes (the shard changed since it was listed)"
        return decode_image(data, record.uri)

    def _describe(self) -> str:
        return repr(self.root)
