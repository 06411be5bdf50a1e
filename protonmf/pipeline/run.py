"""A run's context, built once from its config: :class:`Run`.

Every step of a run needs the same few things derived from its config: the storage options, the
feature store, the preprocessing, the images of a split, the black box, and the keys and staging
folders of what it writes. ``Run(config)`` builds each the first time a step asks, once per
process, and is the one value the steps pass: ``tasks/`` puts it in Ray's object store once per run.
Pickled, a Run is its config alone; each process opens the store and loads the network itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from fsspec import AbstractFileSystem

from protonmf.backbones.feature_backbone import BackboneSpec, FeatureBackbone, build_backbone
from protonmf.config import Config
from protonmf.data import ImageSource, Preprocess
from protonmf.data.store import FeatureStore
from protonmf.lease import Lease, acquire_lease
from protonmf.pipeline.datasets import class_images_sha256, in_memory, make_split_source
from protonmf.pipeline.staging import Staged, craft_key, fit_group_keys, fit_key
from protonmf.storage import to_fs

__all__ = ["Run", "load_backbone"]

#: What a group of a fit stages (gallery first: a staged fit always has its gallery beside it),
#: and a group of CRAFT concepts; the last of each is the group's resume marker.
FIT_FILES = (".gallery.parquet", ".safetensors")
CONCEPT_FILES = (".safetensors", ".json")


@dataclass(frozen=True, eq=False)
class Run:
    """The context of a run of ``config`` (see the module's docstring)."""

    config: Config

    def __reduce__(self):  # the config travels; what it builds is built again where it is used
        return type(self), (self.config,)

    @cached_property
    def storage_options(self) -> dict[str, Any] | None:
        """``storage.storage_options``, or None for fsspec's defaults."""
        return self.config.storage.options

    def fs(self, uri: str) -> tuple[AbstractFileSystem, str]:
        """The filesystem of ``uri`` (opened with the run's storage options) and the path in it."""
        return to_fs(uri, self.storage_options)

    @cached_property
    def preprocess(self) -> Preprocess:
        pp = self.config.data.preprocess
        return Preprocess(resize=pp.resize, crop=pp.crop, mean=tuple(pp.mean), std=tuple(pp.std))

    @cached_property
    def store(self) -> FeatureStore:
        """The run's feature store (made by the prepare step)."""
        return FeatureStore.open(self.config.storage.features, storage_options=self.storage_options)

    @cached_property
    def backbone(self) -> FeatureBackbone:
        """The black box, on the CPU (:func:`load_backbone`)."""
        return load_backbone(self.config)

    @property
    def in_memory(self) -> bool:
        """Whether the images are made in memory (synthetic, digits): nothing to list or index."""
        return in_memory(self.config)

    def source(self, split: str, *, labels: Sequence[int] | None = None,
               classes: Sequence[str] | None = None) -> ImageSource:
        """The training ("train") or held-out ("val") images (:func:`~protonmf.pipeline.datasets.make_split_source`)."""
        return make_split_source(self.config, split, labels=labels, classes=classes)

    @cached_property
    def images_sha256(self) -> list[str]:
        """What each training class is made from now, in label order (:func:`~protonmf.pipeline.datasets.class_images_sha256`)."""
        return class_images_sha256(self.config)

    @cached_property
    def fit_group_keys(self) -> dict[str, str]:
        """The key of each group of the fit (:func:`~protonmf.pipeline.staging.fit_group_keys`)."""
        return fit_group_keys(self.config, self.store.key, self.images_sha256)

    @cached_property
    def fit(self) -> Staged:
        """The staged groups and the publish of the prototype model at ``storage.model``."""
        return Staged(self.config.storage.model, fit_key(self.fit_group_keys), "fit_key", FIT_FILES,
                      self.storage_options)

    @cached_property
    def concepts(self) -> Staged:
        """The staged groups and the publish of the CRAFT concepts at ``storage.concepts``."""
        return Staged(self.config.storage.concepts, craft_key(self.config, self.store.key), "craft_key", CONCEPT_FILES,
                      self.storage_options)

    @contextmanager
    def leases(self, outputs: tuple[str, ...], owner: str | None = None) -> Iterator[dict[str, Lease]]:
        """Hold the leases of ``storage.features`` and of each ``storage.<output>`` (``model``,
        ``concepts``) for the block; yields the held leases by config key.

        Taken in the order of their URIs, so two runs that need an overlapping pair (a build and a
        CRAFT run share the store) never each hold one and wait for the other.
        """
        s = self.config.storage
        keys = sorted({"storage.features": s.features, **{f"storage.{o}": getattr(s, o) for o in outputs}}.items(),
                      key=lambda kv: kv[1])
        with ExitStack() as stack:
            held = {}
            for name, uri in keys:
                lease = acquire_lease(uri, name=name, owner=owner, mode=s.lease, seconds=s.lease_seconds,
                                      timeout=s.lease_timeout, storage_options=self.storage_options)
                stack.callback(lease.release)
                held[name] = lease
            yield held


def load_backbone(config: Config) -> FeatureBackbone:
    """The black box of the run; ``weights: demo`` trains (once, cached) the demo CNN."""
    b = config.backbone
    if b.weights == "demo":
        if not in_memory(config) or b.arch != "protonmf:small_cnn":
            raise ValueError("backbone.weights: 'demo' trains protonmf:small_cnn on the synthetic sets or the digits only")
        from protonmf.demo.backbone import train_demo_backbone

        n_classes = 10 if config.data.source == "digits" else config.data.n_classes
        return train_demo_backbone(
            n_classes=n_classes, image_size=config.data.preprocess.crop, dataset=config.data.source, seed=config.data.seed
        ).backbone
    spec = BackboneSpec(b.arch, b.weights, b.num_classes, b.feature_layer, b.head, dict(b.arch_kwargs))
    return build_backbone(spec)
