"""What makes a run resumable, written once for every artifact a run publishes.

- :func:`run_key`: a stable hash of the settings a result depends on; :func:`features_key`,
  :func:`fit_key` and :func:`craft_key` are the feature store's, the model's and the concepts';
  a rerun with the same key reuses what is there. The model's is made of its groups' keys
  (:func:`fit_group_keys`: the fit's settings, the group's classes and what each was made from),
  so a rerun on grown data refits only the groups whose classes changed.
- :func:`class_groups`: the groups of classes that one worker handles, the unit of staging.
- :class:`Staged`: where each group's result waits before the merge
  (``<artifact URI>.staging/<key[:16]>/g<first>-<last><suffix>``), one resume marker for every
  artifact (a group's last file, written last), and the one publish: skipped when the artifact
  there has the key, else the groups read back, merged, saved, the staging folder removed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from fsspec import AbstractFileSystem

from protonmf.artifact import current_manifest
from protonmf.config import Config
from protonmf.prototypes.fit import fit_settings
from protonmf.prototypes.where import WHERE
from protonmf.storage import concurrently, join, read_bytes, to_fs, write_bytes_atomic

__all__ = ["Staged", "class_groups", "craft_key", "features_key", "fit_group_keys", "fit_key", "group_stem", "run_key"]

def run_key(**parts: Any) -> str:
    """A stable hash of everything ``parts`` holds (JSON with sorted keys; unknown types as str)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def features_key(config: Config, backbone_spec: dict[str, Any], weights_sha256: str, classes: list[str]) -> str:
    """The feature store's key: the network (its spec and the sha256 of its weights, not the name
    of their file), the data settings that change features, the classes, the precision."""
    precision = {} if config.compute.precision == "float32" else {"precision": config.compute.precision}
    return run_key(
        backbone=backbone_spec,
        weights_sha256=weights_sha256,
        data=config.data.model_dump(exclude=set(config.data.NOT_IN_FEATURES_KEY)),
        classes=classes,
        **precision,  # bfloat16 features are other features (float32 keeps the keys of earlier stores)
    )


def fit_settings_of(config: Config) -> dict[str, Any]:
    """The NMF and head settings of a fit, as the model's manifest records them."""
    pr = config.prototypes
    return fit_settings(max_iter=pr.max_iter, tol=pr.tol, seed=pr.seed, nonneg=pr.nonneg, solver=pr.solver,
                        residual=pr.residual)


def fit_group_keys(config: Config, store_key: str, images_sha256: Sequence[str]) -> dict[str, str]:
    """Each group's key (by :func:`group_stem`): the features it is fitted on (the store's key, and
    what each of its classes is made from, ``images_sha256`` in label order), its classes, every
    p, the fit's settings, the gallery (its size, and the definition of "where" it ranks:
    :data:`~protonmf.prototypes.where.WHERE`'s first)."""
    pr = config.prototypes
    fit = run_key(features=store_key, p=pr.p, settings=fit_settings_of(config), gallery=[pr.gallery, WHERE[0]])
    return {group_stem(g): run_key(fit=fit, classes=g, images=[images_sha256[k] for k in g])
            for g in class_groups(len(images_sha256), pr.classes_per_task)}


def fit_key(group_keys: dict[str, str]) -> str:
    """The model's key: its groups' keys (:func:`fit_group_keys`)."""
    return run_key(groups=group_keys)


def craft_key(config: Config, store_key: str) -> str:
    """The concept set's key: the features, CRAFT's settings, the held-out images it is measured on."""
    return run_key(features=store_key, craft=config.craft.model_dump(), val=config.data.val,
                   val_images=config.data.val_images_per_class)


def class_groups(num_classes: int, per_group: int) -> list[list[int]]:
    """Consecutive classes, ``per_group`` at a time (the last group may be smaller)."""
    return [list(range(s, min(s + per_group, num_classes))) for s in range(0, num_classes, per_group)]


def group_stem(classes: Sequence[int]) -> str:
    return f"g{classes[0]:05d}-{classes[-1]:05d}"


@dataclass(frozen=True)
class Staged:
    """The staging folder of the artifact at ``uri`` for the run ``key``.

    ``suffixes``: the files each group stages, in the order they are written; the last one is the
    group's resume marker (a group is complete once it exists), ``field``: the manifest setting
    that holds the key of a published artifact (``fit_key``, ``craft_key``).
    """

    uri: str
    key: str
    field: str
    suffixes: tuple[str, ...]
    storage_options: dict[str, Any] | None = None

    @cached_property
    def _fs_folder(self) -> tuple[AbstractFileSystem, str]:
        fs, root = to_fs(self.uri, self.storage_options)
        return fs, join(root.rstrip("/") + ".staging", self.key[:16])

    @property
    def fs(self) -> AbstractFileSystem:
        return self._fs_folder[0]

    @property
    def folder(self) -> str:
        return self._fs_folder[1]

    def path(self, classes: Sequence[int], suffix: str) -> str:
        return join(self.folder, group_stem(classes) + suffix)

    @property
    def marker(self) -> str:
        return self.suffixes[-1]

    def write(self, classes: Sequence[int], files: dict[str, bytes]) -> None:
        """Stage a group's files (one per suffix), its marker last."""
        if sorted(files) != sorted(self.suffixes):
            raise ValueError(f"a staged group holds {list(self.suffixes)}, got {sorted(files)}")
        for suffix in self.suffixes:
            write_bytes_atomic(self.fs, self.path(classes, suffix), files[suffix])

    def read(self, classes: Sequence[int], also: Sequence[str] = ()) -> dict[str, bytes] | None:
        """A complete group's marker and the files ``also`` names, or None if it is not complete.

        The marker is read where it is looked up (one request, not an exists and a read)."""
        try:
            files = {self.marker: read_bytes(self.fs, self.path(classes, self.marker))}
        except FileNotFoundError:
            return None
        for suffix in also:
            files[suffix] = read_bytes(self.fs, self.path(classes, suffix))
        return files

    def is_published(self) -> bool:
        """Whether the artifact at ``uri`` was published from this very key."""
        manifest = current_manifest(self.uri, storage_options=self.storage_options)
        return manifest is not None and manifest.get("settings", {}).get(self.field) == self.key

    def publish(self, groups: list[list[int]], merge: Callable[[list[dict[str, bytes]]], None], what: str,
                reused: Callable[[], dict[str, dict[str, bytes]]] | None = None) -> str:
        """Publish the artifact once: unless it is published from this key already, read every
        group's files (several at once; a missing group is named with ``what``), ``merge`` them
        (it saves the artifact, manifest last) and remove the staging folder. Returns ``uri``.

        ``reused``: the files of the groups taken as they are from the artifact published before
        (by :func:`group_stem`), called only if there is something to publish; those groups are
        not read from the staging folder."""
        if self.is_published():
            return self.uri
        kept = reused() if reused is not None else {}

        def staged(classes: list[int]) -> dict[str, bytes]:
            if group_stem(classes) in kept:
                return kept[group_stem(classes)]
            files = self.read(classes, also=self.suffixes[:-1])
            if files is None:
                raise FileNotFoundError(f"the {what} of classes {classes[0]}–{classes[-1]}: "
                                        f"{self.path(classes, self.marker)} is missing")
            return files

        merge(concurrently(staged, groups))
        if len(kept) < len(groups):  # else nothing was staged
            self.fs.rm(self.folder, recursive=True)
        return self.uri
