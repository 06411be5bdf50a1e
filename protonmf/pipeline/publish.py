"""Step 4, publish: every staged group merged into one prototype model artifact at
``storage.model`` (a new version, manifest last; :meth:`~protonmf.pipeline.staging.Staged.publish`)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from protonmf.backbones.feature_backbone import weights_sha256
from protonmf.config import Config
from protonmf.pipeline.fit import prototypes_by_p, published_group_files
from protonmf.pipeline.run import Run
from protonmf.pipeline.staging import class_groups, fit_settings_of
from protonmf.prototypes.fit import ClassPrototypes
from protonmf.prototypes.gallery import read_gallery
from protonmf.prototypes.model import PrototypeModel

__all__ = ["held_out_data", "publish_prototype_model"]


def held_out_data(config: Config) -> dict[str, Any]:
    """The run's data config without what only training reads: enough for ``protonmf evaluate
    MODEL_URI`` to find the held-out images again (source, val, classes, preprocess,
    val_images_per_class; n_classes and seed for the synthetic set and the digits)."""
    return config.data.model_dump(mode="json", exclude={"train", "max_images_per_class"})


def publish_prototype_model(run: Run) -> str:
    """Merge every staged group into one artifact at ``storage.model``; its URI.

    If the artifact there already comes from the same fit key, it is kept as it is; the groups it
    holds as this fit makes them are taken from it, the others from the staging folder.
    """
    config, store = run.config, run.store

    def merge(groups: list[dict[str, bytes]]) -> None:
        by_p = [prototypes_by_p(g[".safetensors"]) for g in groups]
        fits = [ClassPrototypes.concat([b[p] for b in by_p]) for p in config.prototypes.p]
        backbone = run.backbone.cpu()
        model = PrototypeModel.from_prototypes(
            backbone,
            fits,
            store.class_names,
            preprocess=run.preprocess.to_dict(),
            settings={**fit_settings_of(config), "p": list(config.prototypes.p), "fit_key": run.fit.key,
                      "group_keys": run.fit_group_keys,
                      "features": store.uri, "weights_sha256": weights_sha256(backbone.model),
                      "data": held_out_data(config), "gallery": config.prototypes.gallery},
            gallery=pa.concat_tables([read_gallery(g[".gallery.parquet"]) for g in groups]),
        )
        model.save(config.storage.model, keep_versions=config.storage.keep_versions, storage_options=run.storage_options)

    groups = class_groups(len(store.class_names), config.prototypes.classes_per_task)
    return run.fit.publish(groups, merge, what="fit", reused=lambda: published_group_files(run, groups))
