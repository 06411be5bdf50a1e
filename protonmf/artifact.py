"""Artifacts: immutable versions of a folder of files, and one small pointer to the current one.

Both published artifacts (the prototype model, :mod:`protonmf.prototypes.model`, and the CRAFT
concepts, :mod:`protonmf.craft.artifact`) use these functions, so both keep the same promises::

    <uri>/current.json                  {"version": id, "manifest_sha256": ...}: the one object a
                                        publish switches, in a single write (a PUT is atomic on S3)
    <uri>/versions/<id>/manifest.json   format, metadata, and every file's sha256 and size
    <uri>/versions/<id>/<file>          the files, never changed once the version is published

- a reader never sees a half-written artifact: a version's files are written and read back, its
  manifest goes last, and only then does the pointer move; a reader that resolved the pointer
  keeps reading its version while a newer one is published, and a publish that dies mid-way
  leaves the pointer (and so the previous version) as it was;
- a reader checks each file it reads against the manifest's sha256 and names the bad file;
- the newest ``keep`` versions stay (an older one can be opened by id); older ones, and versions a
  dead publish left unfinished, are removed after a publish;
- an artifact written before versions existed (``<uri>/manifest.json`` beside its files) still opens.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem

from protonmf import __version__
from protonmf.storage import join, read_bytes, sha256, to_fs, write_bytes_atomic

__all__ = [
    "MANIFEST", "POINTER", "VERSIONS", "ArtifactError", "ArtifactReader", "attach_file", "current_manifest",
    "list_versions", "open_artifact", "read_attached", "write_artifact",
]

MANIFEST = "manifest.json"
POINTER = "current.json"
VERSIONS = "versions"


class ArtifactError(ValueError):
    """An artifact is missing, incomplete, or does not match its manifest."""


def _new_version_id() -> str:
    """Sortable by creation time, unique across concurrent writers."""
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z-{uuid.uuid4().hex[:8]}"


def write_artifact(
    uri: str,
    files: dict[str, bytes],
    meta: dict[str, Any],
    *,
    format: str,
    format_version: int,
    keep: int = 3,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Publish ``files`` as a new version of the artifact at ``uri``; returns the version's id.

    ``keep`` (≥ 1): how many published versions stay.
    """
    if keep < 1:
        raise ValueError(f"keep must be ≥ 1 (versions of the artifact kept), got {keep}")
    fs, root = to_fs(uri, storage_options)
    vid = _new_version_id()
    folder = join(root, VERSIONS, vid)
    for name, data in files.items():
        write_bytes_atomic(fs, join(folder, name), data)
    for name, data in files.items():  # verify what landed before anything points at it
        if sha256(read_bytes(fs, join(folder, name))) != sha256(data):
            raise ArtifactError(f"{join(uri, VERSIONS, vid, name)} did not read back as written")
    manifest = {
        "format": format,
        "format_version": format_version,
        "protonmf_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "version": vid,
        **meta,
        "files": {name: {"sha256": sha256(data), "bytes": len(data)} for name, data in files.items()},
    }
    body = json.dumps(manifest, indent=2).encode()
    write_bytes_atomic(fs, join(folder, MANIFEST), body)
    pointer = {"version": vid, "manifest_sha256": sha256(body), "format": format, "created": manifest["created"]}
    write_bytes_atomic(fs, join(root, POINTER), json.dumps(pointer, indent=2).encode())  # the switch
    _prune(fs, root, vid, keep)
    return vid


def _prune(fs: AbstractFileSystem, root: str, current: str, keep: int) -> None:
    """Remove published versions beyond the newest ``keep`` and unfinished ones older than ``current``
    (a newer unfinished one may be another run's publish in progress)."""
    versions = join(root, VERSIONS)
    ids = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(versions, detail=False))
    done = [i for i in ids if fs.exists(join(versions, i, MANIFEST))]
    kept = set(done[-keep:]) | {current}
    for i in ids:
        if i not in kept and (i in done or i < current):
            fs.rm(join(versions, i), recursive=True)


def list_versions(uri: str, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The published versions of the artifact at ``uri``, oldest first."""
    return _published(*to_fs(uri, storage_options))


def _published(fs: AbstractFileSystem, root: str) -> list[str]:
    versions = join(root, VERSIONS)
    if not fs.exists(versions):
        return []
    ids = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(versions, detail=False))
    return [i for i in ids if fs.exists(join(versions, i, MANIFEST))]


@dataclass
class ArtifactReader:
    """A verified manifest of one version; :meth:`blob` reads one of its files and checks its sha256."""

    uri: str  # the version's folder (error messages name it)
    manifest: dict[str, Any]
    fs: AbstractFileSystem
    root: str
    what: str
    version: str | None  # None: an artifact written before versions

    def path(self, name: str) -> str:
        return join(self.root, name)

    def blob(self, name: str) -> bytes:
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise ArtifactError(f"{join(self.uri, MANIFEST)} lists no file {name!r}")
        path = join(self.root, name)
        if not self.fs.exists(path):
            raise ArtifactError(f"{self.what} file {join(self.uri, name)} is missing")
        data = read_bytes(self.fs, path)
        if sha256(data) != entry["sha256"]:
            raise ArtifactError(
                f"{self.what} file {join(self.uri, name)} does not match its sha256 in the manifest (corrupt or changed)"
            )
        return data


def _locate(fs: AbstractFileSystem, root: str, uri: str, what: str, version: str | None) -> tuple[str, str, str | None, str | None]:
    """(folder, URI of the folder, version id, expected sha256 of its manifest) of the version to read."""
    if version is not None:
        folder = join(root, VERSIONS, version)
        if not fs.exists(join(folder, MANIFEST)):
            raise ArtifactError(f"the {what} at {uri!r} has no version {version!r}; versions: {_published(fs, root)}")
        return folder, join(uri, VERSIONS, version), version, None
    if fs.exists(join(root, POINTER)):
        try:
            pointer = json.loads(read_bytes(fs, join(root, POINTER)))
            vid = pointer["version"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ArtifactError(f"{join(uri, POINTER)} is not a valid pointer: {err}") from err
        return join(root, VERSIONS, vid), join(uri, VERSIONS, vid), vid, pointer.get("manifest_sha256")
    if fs.exists(join(root, MANIFEST)):  # written before versions existed
        return root, str(uri), None, None
    if not fs.exists(root):
        raise ArtifactError(f"no {what} at {uri!r}: it does not exist")
    raise ArtifactError(f"no {what} at {uri!r}: neither {POINTER} nor {MANIFEST} (not an artifact, or not finished)")


def open_artifact(
    uri: str,
    *,
    format: str,
    format_version: int,
    what: str,
    version: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ArtifactReader:
    """Read and check the manifest of the current version at ``uri`` (or of the version ``version``).

    ``what`` names the artifact in errors ("model").
    """
    fs, root = to_fs(uri, storage_options)
    folder, folder_uri, vid, expected = _locate(fs, root, uri, what, version)
    path = join(folder, MANIFEST)
    if not fs.exists(path):
        raise ArtifactError(f"no {what} at {uri!r}: {join(folder_uri, MANIFEST)} is missing")
    body = read_bytes(fs, path)
    if expected is not None and sha256(body) != expected:
        raise ArtifactError(f"{join(folder_uri, MANIFEST)} does not match the sha256 in {join(uri, POINTER)} (changed)")
    try:
        manifest = json.loads(body)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{join(folder_uri, MANIFEST)} is not valid JSON: {err}") from err
    if manifest.get("format") != format or manifest.get("format_version") != format_version:
        raise ArtifactError(
            f"{join(folder_uri, MANIFEST)} is not a {format} v{format_version} manifest "
            f"(format {manifest.get('format')!r} v{manifest.get('format_version')!r})"
        )
    return ArtifactReader(folder_uri, manifest, fs, folder, what, vid)


def current_manifest(uri: str, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The manifest of the current version at ``uri``, unchecked, or None if nothing is published."""
    fs, root = to_fs(uri, storage_options)
    try:
        folder, _, _, _ = _locate(fs, root, uri, "artifact", None)
    except ArtifactError:
        return None
    path = join(folder, MANIFEST)
    return json.loads(read_bytes(fs, path)) if fs.exists(path) else None


def read_attached(uri: str, version: str | None, name: str, *, storage_options: dict[str, Any] | None = None) -> bytes | None:
    """The file ``name`` that :func:`attach_file` put beside ``version``, or None if there is none."""
    fs, root = to_fs(uri, storage_options)
    parts = (VERSIONS, version, name) if version else (name,)
    try:
        return read_bytes(fs, join(root, *parts))
    except FileNotFoundError:
        return None


def attach_file(uri: str, version: str | None, name: str, data: bytes, *, storage_options: dict[str, Any] | None = None) -> str:
    """Put a file derived from a published version (its HTML report) in that version's folder, and
    return its URI. It is not among the version's checksummed files: it describes them, it is not
    part of them; it goes with its version (pruned with it, replaced by the next version's)."""
    fs, root = to_fs(uri, storage_options)
    parts = (VERSIONS, version, name) if version else (name,)
    write_bytes_atomic(fs, join(root, *parts), data)
    return join(uri, *parts)
