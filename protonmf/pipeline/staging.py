"""What makes a run resumable, written once for every artifact a run publishes.

- :func:`run_key`: a stable hash of the settings a result depends on (feature store, fit,
  concepts); a rerun with the same key reuses what is there.
- :func:`class_groups`: the groups of classes that one worker handles, the unit of staging.
- :func:`group_stem` / :func:`staging_dir`: where a group's result waits before the merge:
  ``<artifact URI>.staging/<key[:16]>/g<first>-<last>``.
- :func:`published_key`: the run key an artifact was published with (None if there is none), so
  that publishing the same key again is skipped.
- :func:`run_leases`: one run at a time on the feature store and the artifact a run writes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from fsspec import AbstractFileSystem

from protonmf.artifact import current_manifest
from protonmf.config import Config
from protonmf.lease import acquire_lease
from protonmf.storage import join, to_fs

__all__ = ["class_groups", "group_stem", "published_key", "run_key", "run_leases", "staging_dir"]


def run_key(**parts: Any) -> str:
    """A stable hash of everything ``parts`` holds (JSON with sorted keys; unknown types as str)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def class_groups(num_classes: int, per_group: int) -> list[list[int]]:
    """Consecutive classes, ``per_group`` at a time (the last group may be smaller)."""
    return [list(range(s, min(s + per_group, num_classes))) for s in range(0, num_classes, per_group)]


def group_stem(classes: list[int]) -> str:
    return f"g{classes[0]:05d}-{classes[-1]:05d}"


def staging_dir(uri: str, key: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem and the staging folder of the artifact at ``uri`` for the run ``key``."""
    fs, root = to_fs(uri, storage_options)
    return fs, join(root.rstrip("/") + ".staging", key[:16])


def published_key(uri: str, field: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """``settings[field]`` of the current version of the artifact at ``uri``, or None if nothing is published."""
    manifest = current_manifest(uri, storage_options=storage_options)
    return None if manifest is None else manifest.get("settings", {}).get(field)


@contextmanager
def run_leases(config: Config, outputs: tuple[str, ...], owner: str | None = None) -> Iterator[dict[str, Any]]:
    """Hold the leases of ``storage.features`` and of each ``storage.<output>`` (``model``,
    ``concepts``) for the block; yields the held leases by config key.

    Taken in the order of their URIs, so two runs that need an overlapping pair (a build and a
    CRAFT run share the store) never each hold one and wait for the other.
    """
    s = config.storage
    keys = sorted({"storage.features": s.features, **{f"storage.{o}": getattr(s, o) for o in outputs}}.items(),
                  key=lambda kv: kv[1])
    with ExitStack() as stack:
        held = {}
        for name, uri in keys:
            lease = acquire_lease(uri, name=name, owner=owner, mode=s.lease, seconds=s.lease_seconds,
                                  timeout=s.lease_timeout, storage_options=s.storage_options or None)
            stack.callback(lease.release)
            held[name] = lease
        yield held
