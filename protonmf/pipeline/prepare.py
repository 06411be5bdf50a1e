"""Step 1, prepare: check the config's locations, pin the black box's weights, list the data once
into its dataset index, and create (or reopen) the feature store.

:func:`preflight` runs first, in seconds, where the flow runs; :func:`prepare_run` does the rest
where the storage is and returns a :class:`Prepared`, what extraction starts from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import save as save_safetensors

from protonmf.backbones.feature_backbone import FeatureBackbone, is_weights_file, weights_sha256
from protonmf.data.sources.shards import shard_folder
from protonmf.data.store import FeatureStore
from protonmf.pipeline.datasets import images_per_class, index_data, make_split_source
from protonmf.pipeline.run import Run
from protonmf.pipeline.staging import features_key
from protonmf.storage import join, write_bytes_atomic

__all__ = ["Prepared", "check_before_start", "check_data", "preflight", "prepare_run", "prepare_store", "resolve_backbone"]


@dataclass(frozen=True)
class Prepared:
    """What a run's prepare step found, and what extraction starts from.

    run: the run with the black box's weights and the dataset index pinned in its config (see
        :func:`resolve_backbone` and :func:`~protonmf.pipeline.datasets.index_data`).
    class_names: the store's class names, in logit order.
    sizes: the training images of each class, in label order.
    """

    run: Run
    class_names: list[str]
    sizes: list[int]


def preflight(run: Run) -> None:
    """Fail within seconds, naming the key, if a location of the config cannot be reached.

    Object stores: the bucket must answer a listing (an unreachable endpoint, a missing bucket and
    refused credentials are told apart). Data roots must exist.
    """
    config = run.config
    checks = [("storage.features", config.storage.features, False), ("storage.model", config.storage.model, False)]
    if not run.in_memory:
        if not config.data.train:
            raise ValueError(f"data.train: required for source {config.data.source!r}")
        checks.append(("data.train", config.data.train, True))
        if config.data.val:
            checks.append(("data.val", config.data.val, True))
    for key, uri, must_exist in checks:
        fs, path = run.fs(uri)
        if "://" in str(uri) and not str(uri).startswith("file://"):
            bucket = path.split("/", 1)[0]
            try:
                fs.ls(bucket, detail=False)
            except FileNotFoundError:
                raise ValueError(f"{key}: the bucket {bucket!r} of {uri!r} does not exist") from None
            except PermissionError as err:
                raise ValueError(f"{key}: access to {uri!r} refused: {err}") from None
            except Exception as err:  # noqa: BLE001 - endpoint down, DNS, TLS: all "cannot reach"
                raise ValueError(f"{key}: cannot reach {uri!r}: {type(err).__name__}: {err}") from None
        if must_exist and not fs.exists(shard_folder(path)):  # a glob of shards: its folder
            raise ValueError(f"{key}: {uri!r} does not exist")


def check_before_start(run: Run) -> None:
    """What can be checked in seconds before a run starts Prefect and Ray, each error naming its
    config key: the locations (:func:`preflight`), and a black box whose weights are a file: it
    exists, is a checkpoint, and fits ``backbone.arch`` (the layers that differ named). Weights
    by name (torchvision, timm) are fetched and checked by the prepare step."""
    preflight(run)
    weights = run.config.backbone.weights
    if weights not in (None, "demo") and is_weights_file(weights):
        _ = run.backbone  # built once: the prepare step of an in-process run reuses it


def resolve_backbone(run: Run) -> tuple[Run, FeatureBackbone]:
    """Load the black box once and pin its weights, so every worker loads the very same network.

    Whatever ``backbone.weights`` names (a torchvision enum or timm tag fetched here, ``demo``
    trained here, a file, or ``null``: a random init drawn from ``prototypes.seed``), the weights
    actually loaded are written once to ``<storage.features>/weights/<sha256>.safetensors`` and
    the returned run's config points there: workers need no internet and no node-local cache, and
    a checkpoint overwritten at its old path cannot reach a run that already started.
    """
    config = run.config
    if config.backbone.weights is None:
        torch.manual_seed(config.prototypes.seed)
    backbone = run.backbone
    digest = weights_sha256(backbone.model)
    fs, root = run.fs(config.storage.features)
    path = join(root, "weights", f"{digest}.safetensors")
    if not fs.exists(path):  # content-addressed: an existing file holds these very weights
        state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
        write_bytes_atomic(fs, path, save_safetensors(state))
    weights = join(config.storage.features, "weights", f"{digest}.safetensors")
    pinned = config.model_copy(update={"backbone": config.backbone.model_copy(update={"weights": weights})})
    return Run(pinned), backbone


@torch.no_grad()
def _grid(backbone: FeatureBackbone, crop: int) -> tuple[int, int, int]:
    F = backbone(torch.zeros(1, 3, crop, crop, device=backbone.V.device))
    return F.shape[1], F.shape[2], F.shape[3]


def check_data(run: Run, dim: int) -> None:
    """What can be found wrong before hours of extraction, each named with its config key: a
    prototype count above the feature dimension D, held-out classes that are not the model's
    (named by :func:`~protonmf.pipeline.datasets.make_split_source`, which maps them by name).
    Class folders without images are named where the data is listed (:func:`~protonmf.pipeline.datasets.list_split`)."""
    config = run.config
    too_many = [p for p in config.prototypes.p if p > dim]
    if too_many:
        raise ValueError(f"prototypes.p: {too_many} larger than the feature dimension D = {dim} of "
                         f"{config.backbone.arch}'s features (NMF needs p <= D)")
    if config.data.val:  # held-out classes are mapped to the model's by name here: one it does not know is named
        run.source("val")


def prepare_store(run: Run, backbone: FeatureBackbone, classes: list[str]) -> FeatureStore:
    """Create the run's feature store for ``classes`` (in logit order), or reopen it if a run with
    the same settings made it (after :func:`check_data`)."""
    config = run.config
    h, w, D = _grid(backbone, config.data.preprocess.crop)
    check_data(run, D)
    if len(classes) != backbone.num_classes:
        raise ValueError(
            f"data has {len(classes)} classes but the backbone's head has {backbone.num_classes} "
            "(set backbone.num_classes or data.classes)"
        )
    return FeatureStore.create(
        config.storage.features,
        key=features_key(config, backbone.spec_dict(), weights_sha256(backbone.model), list(classes)),
        class_names=list(classes),
        grid=(h, w),
        dim=D,
        V=backbone.V,
        bias=backbone.bias,
        meta={"backbone": backbone.spec_dict(), "preprocess": run.preprocess.to_dict()},
        storage_options=run.storage_options,
    )


def prepare_run(run: Run) -> Prepared:
    """Pin the weights, index the data (the only listing of the data in a run), open the store."""
    run, backbone = resolve_backbone(run)
    run = Run(index_data(run.config))
    store = prepare_store(run, backbone, list(make_split_source(run.config, "train", labels=[]).classes))
    return Prepared(run, store.class_names, images_per_class(run.config))
