"""Artifacts: a folder of files plus ``manifest.json``, written last, holding every file's sha256.

Both published artifacts (the prototype model, :mod:`protonmf.prototypes.model`, and the CRAFT concepts,
:mod:`protonmf.craft.artifact`) use these two functions, so both keep the same promises:

- a reader never sees a half-written artifact: the old manifest is removed before any file
  changes, files are written and read back, and the new manifest goes last;
- a reader checks each file it reads against the manifest's sha256 and names the bad file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem

from protonmf import __version__
from protonmf.storage import join, read_bytes, sha256, to_fs, write_bytes_atomic

__all__ = ["MANIFEST", "ArtifactError", "ArtifactReader", "open_artifact", "write_artifact"]

MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact is missing, incomplete, or does not match its manifest."""


def write_artifact(
    uri: str,
    files: dict[str, bytes],
    meta: dict[str, Any],
    *,
    format: str,
    version: int,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write ``files`` under ``uri`` and then the manifest (``meta`` plus format and checksums)."""
    fs, root = to_fs(uri, storage_options)
    if fs.exists(join(root, MANIFEST)):
        fs.rm(join(root, MANIFEST))  # the old artifact stops being valid before its files change
    for name, data in files.items():
        write_bytes_atomic(fs, join(root, name), data)
    for name, data in files.items():  # verify what landed before committing the manifest
        if sha256(read_bytes(fs, join(root, name))) != sha256(data):
            raise ArtifactError(f"{join(uri, name)} did not read back as written")
    manifest = {
        "format": format,
        "format_version": version,
        "protonmf_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **meta,
        "files": {name: {"sha256": sha256(data), "bytes": len(data)} for name, data in files.items()},
    }
    write_bytes_atomic(fs, join(root, MANIFEST), json.dumps(manifest, indent=2).encode())
    return str(uri)


@dataclass
class ArtifactReader:
    """A verified manifest; :meth:`blob` reads one of its files and checks its sha256."""

    uri: str
    manifest: dict[str, Any]
    fs: AbstractFileSystem
    root: str
    what: str

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


def open_artifact(
    uri: str, *, format: str, version: int, what: str, storage_options: dict[str, Any] | None = None
) -> ArtifactReader:
    """Read and check the manifest at ``uri``; ``what`` names the artifact in errors ("model")."""
    fs, root = to_fs(uri, storage_options)
    manifest_path = join(root, MANIFEST)
    if not fs.exists(manifest_path):
        raise ArtifactError(f"no {what} at {uri!r}: {MANIFEST} is missing (not an artifact, or not finished)")
    try:
        manifest = json.loads(read_bytes(fs, manifest_path))
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{join(uri, MANIFEST)} is not valid JSON: {err}") from err
    if manifest.get("format") != format or manifest.get("format_version") != version:
        raise ArtifactError(
            f"{join(uri, MANIFEST)} is not a {format} v{version} manifest "
            f"(format {manifest.get('format')!r} v{manifest.get('format_version')!r})"
        )
    return ArtifactReader(str(uri), manifest, fs, root, what)
