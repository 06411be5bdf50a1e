"""The steps of a run, as plain functions of a :class:`~protonmf.config.Config`.

``tasks/`` runs these on Ray and ``flows/`` orders them with Prefect; here they know neither, and
a notebook can call them one after the other:

1. :func:`index_data` lists the data once into a dataset index; :func:`prepare_store` opens (or
   resumes) the feature store of the run.
2. :func:`extract_group` extracts the features of some classes into it (in one process; on Ray
   :func:`decode_group` decodes on CPUs and :func:`forward_group` forwards and writes).
3. :func:`fit_group` fits the prototypes of some classes (every p) into a staging file.
4. :func:`publish_model` merges the staged groups into one model artifact, manifest last.
5. :func:`evaluate_run` compares the published model with its black box on held-out images (on
   Ray, :func:`evaluate_shard` measures shards of them apart, :func:`evaluation_shards`, and
   :func:`evaluate_run` finishes from their merged statistics).

Everything a step writes is keyed by a hash of the settings it depends on, so a rerun resumes:
complete classes and groups are read, not recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from protonmf.artifact import attach_file
from protonmf.backbones.feature_backbone import BackboneSpec, FeatureBackbone, build_backbone, weights_sha256
from protonmf.config import Config
from protonmf.data import ImageSource, Preprocess
from protonmf.devices import step_device
from protonmf.evaluation.held_out import HeldOutStats, accumulate_held_out, held_out_shards, summarize_held_out
from protonmf.evaluation.published import finish_evaluation
from protonmf.data.extract import ClassExtraction, DecodedClass, decode_class, extract_classes, extract_decoded
from protonmf.data.sources.shards import shard_folder
from protonmf.pipeline.datasets import index_data, make_split_source
from protonmf.pipeline.staging import class_groups, group_stem, published_key, run_key, staging_dir
from protonmf.prototypes.fit import ClassPrototypes, fit_classes_and_codes, fit_settings
from protonmf.prototypes.gallery import GALLERY_SCHEMA, TopCodes, gallery_table, read_gallery, write_gallery
from protonmf.prototypes.model import PrototypeModel
from protonmf.storage import concurrently, join, read_bytes, to_fs, write_bytes_atomic
from protonmf.data.store import FeatureStore

__all__ = [
    "GroupFit",
    "class_groups",
    "decode_group",
    "evaluate_run",
    "evaluate_shard",
    "evaluation_shards",
    "extract_group",
    "fit_group",
    "fit_key",
    "held_out_data",
    "forward_group",
    "index_data",
    "load_backbone",
    "load_published_model",
    "make_preprocess",
    "make_split_source",
    "check_data",
    "preflight",
    "prepare_store",
    "publish_model",
    "published_fits",
    "resolve_backbone",
]


def preflight(config: Config) -> None:
    """Fail within seconds, naming the key, if a location of the config cannot be reached.

    Object stores: the bucket must answer a listing (an unreachable endpoint, a missing bucket and
    refused credentials are told apart). Data roots must exist.
    """
    opts = config.storage.storage_options or None
    checks = [("storage.features", config.storage.features, False), ("storage.model", config.storage.model, False)]
    if config.data.source not in ("synthetic", "digits"):
        if not config.data.train:
            raise ValueError(f"data.train: required for source {config.data.source!r}")
        checks.append(("data.train", config.data.train, True))
        if config.data.val:
            checks.append(("data.val", config.data.val, True))
    for key, uri, must_exist in checks:
        fs, path = to_fs(uri, opts)
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


def make_preprocess(config: Config) -> Preprocess:
    pp = config.data.preprocess
    return Preprocess(resize=pp.resize, crop=pp.crop, mean=tuple(pp.mean), std=tuple(pp.std))


def resolve_backbone(config: Config) -> tuple[Config, FeatureBackbone]:
    """Load the black box once and pin its weights, so every worker loads the very same network.

    Whatever ``backbone.weights`` names (a torchvision enum or timm tag fetched here, ``demo``
    trained here, a file, or ``null``: a random init drawn from ``prototypes.seed``), the weights
    actually loaded are written once to ``<storage.features>/weights/<sha256>.safetensors`` and
    the returned config points there: workers need no internet and no node-local cache, and a
    checkpoint overwritten at its old path cannot reach a run that already started.
    """
    if config.backbone.weights is None:
        torch.manual_seed(config.prototypes.seed)
    backbone = load_backbone(config)
    digest = weights_sha256(backbone.model)
    fs, root = to_fs(config.storage.features, config.storage.storage_options or None)
    path = join(root, "weights", f"{digest}.safetensors")
    if not fs.exists(path):  # content-addressed: an existing file holds these very weights
        state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
        write_bytes_atomic(fs, path, save_safetensors(state))
    weights = join(config.storage.features, "weights", f"{digest}.safetensors")
    pinned = config.model_copy(update={"backbone": config.backbone.model_copy(update={"weights": weights})})
    return pinned, backbone


def load_backbone(config: Config) -> FeatureBackbone:
    """The black box of the run; ``weights: demo`` trains (once, cached) the demo CNN."""
    b = config.backbone
    if b.weights == "demo":
        if config.data.source not in ("synthetic", "digits") or b.arch != "protonmf:small_cnn":
            raise ValueError("backbone.weights: 'demo' trains protonmf:small_cnn on the synthetic set or the digits only")
        from protonmf.demo.backbone import train_demo_backbone

        n_classes = 10 if config.data.source == "digits" else config.data.n_classes
        return train_demo_backbone(
            n_classes=n_classes, image_size=config.data.preprocess.crop, dataset=config.data.source, seed=config.data.seed
        ).backbone
    spec = BackboneSpec(b.arch, b.weights, b.num_classes, b.feature_layer, b.head, dict(b.arch_kwargs))
    return build_backbone(spec)


@torch.no_grad()
def _grid(backbone: FeatureBackbone, crop: int) -> tuple[int, int, int]:
    F = backbone(torch.zeros(1, 3, crop, crop, device=backbone.V.device))
    return F.shape[1], F.shape[2], F.shape[3]


def _features_key(config: Config, backbone: FeatureBackbone, classes: list[str]) -> str:
    precision = {} if config.compute.precision == "float32" else {"precision": config.compute.precision}
    return run_key(
        backbone=backbone.spec_dict(),
        weights_sha256=weights_sha256(backbone.model),  # the network itself, not the name of its file
        data=config.data.model_dump(exclude=set(config.data.NOT_IN_FEATURES_KEY)),
        classes=classes,
        **precision,  # bfloat16 features are other features (float32 keeps the keys of earlier stores)
    )


def check_data(config: Config, train: ImageSource, dim: int) -> None:
    """What can be found wrong before hours of extraction, each named with its config key: a
    prototype count above the feature dimension D, a class folder without images, held-out
    classes that are not the model's (named by :func:`make_split_source`, which maps them by name).
    Class folders without images are named where the data is listed (:func:`~protonmf.pipeline.datasets.list_split`)."""
    too_many = [p for p in config.prototypes.p if p > dim]
    if too_many:
        raise ValueError(f"prototypes.p: {too_many} larger than the feature dimension D = {dim} of "
                         f"{config.backbone.arch}'s features (NMF needs p <= D)")
    if config.data.val:  # held-out classes are mapped to the model's by name here: one it does not know is named
        make_split_source(config, "val")


def prepare_store(config: Config, backbone: FeatureBackbone, source: ImageSource) -> FeatureStore:
    """Create the run's feature store, or reopen it if a run with the same settings made it
    (after :func:`check_data`)."""
    h, w, D = _grid(backbone, config.data.preprocess.crop)
    check_data(config, source, D)
    if len(source.classes) != backbone.num_classes:
        raise ValueError(
            f"data has {len(source.classes)} classes but the backbone's head has {backbone.num_classes} "
            "(set backbone.num_classes or data.classes)"
        )
    return FeatureStore.create(
        config.storage.features,
        key=_features_key(config, backbone, list(source.classes)),
        class_names=list(source.classes),
        grid=(h, w),
        dim=D,
        V=backbone.V,
        bias=backbone.bias,
        meta={"backbone": backbone.spec_dict(), "preprocess": make_preprocess(config).to_dict()},
        storage_options=config.storage.storage_options or None,
    )


def extract_group(
    config: Config, backbone: FeatureBackbone, source: ImageSource, store: FeatureStore, classes: list[int], **kwargs: Any
) -> list[ClassExtraction]:
    """Extract ``classes`` in this process (decoding threads beside the forward pass)."""
    c = config.compute
    kwargs.setdefault("device", step_device(c.extract_gpus, "compute.extract_gpus"))
    return extract_classes(
        backbone, source, make_preprocess(config), store, classes, batch_size=c.batch_size,
        precision=c.precision, channels_last=c.channels_last, **kwargs,
    )


#: Reading threads of one decode task: object storage answers a GET in tens of milliseconds, so a
#: few reads in flight keep the task's one core decoding instead of waiting.
DECODE_THREADS = 4


def decode_group(config: Config, classes: list[int]) -> list[DecodedClass]:
    """Read, decode and crop the images of ``classes`` (the CPU half of extraction), reading only
    their rows of the dataset index.

    A few classes (ImageNet's, of ~1,300 images) are decoded one after another, each on
    ``DECODE_THREADS`` threads; many (small classes go to a task together) are decoded
    ``IN_FLIGHT`` classes at once, each on the thread that reads it: a thread pool per class of
    three images would cost more than its reads.
    """
    source = make_split_source(config, "train", labels=classes)
    pre, batch = make_preprocess(config), config.compute.batch_size
    if len(classes) < DECODE_THREADS:
        return [decode_class(source, pre, k, workers=DECODE_THREADS, batch_size=batch) for k in classes]
    return concurrently(lambda k: decode_class(source, pre, k, workers=0, batch_size=batch), classes)


def forward_group(
    config: Config, backbone: FeatureBackbone, store: FeatureStore, decoded: list[DecodedClass],
) -> list[ClassExtraction]:
    """Forward decoded classes and write each to the store (the GPU half of extraction; the
    writes of earlier classes overlap the forward pass of later ones, see :func:`extract_decoded`)."""
    c = config.compute
    return extract_decoded(backbone, decoded, make_preprocess(config), store, batch_size=c.batch_size,
                           device=step_device(c.extract_gpus, "compute.extract_gpus"),
                           precision=c.precision, channels_last=c.channels_last)


def fit_key(config: Config, store: FeatureStore) -> str:
    pr = config.prototypes
    return run_key(features=store.key, p=pr.p, settings=_settings(config), gallery=pr.gallery)


def _settings(config: Config) -> dict[str, Any]:
    pr = config.prototypes
    return fit_settings(max_iter=pr.max_iter, tol=pr.tol, seed=pr.seed, nonneg=pr.nonneg, solver=pr.solver,
                        residual=pr.residual)


@dataclass(frozen=True)
class GroupFit:
    """What fitting one group of classes did (small, returned by workers)."""

    classes: list[int]
    feature_error: dict[int, list[float]]  # p -> per class ||A − EB||² / ||A||²
    head_error: dict[int, list[float]]  # p -> per class ||V − CB||² / ||V||²
    n_iter: dict[int, list[int]]
    resumed: bool
    no_images: list[int]  # classes without a usable image: residual only (fit.residual_only)




def fit_group(config: Config, store: FeatureStore, classes: list[int], *, device: str | None = None) -> GroupFit:
    """Fit every p of the config for ``classes`` from stored features; staged, resumable.

    The NMF runs on ``device``, by default CUDA if ``compute.fit_gpus`` > 0, else the CPU
    (:func:`~protonmf.devices.step_device`); the features stream to it from the CPU.
    """
    key = fit_key(config, store)
    fs, staging = staging_dir(config.storage.model, key, config.storage.storage_options or None)
    path = join(staging, group_stem(classes) + ".safetensors")
    try:  # staged by an earlier attempt (read where it is looked up: one request, not two)
        tensors, resumed = load_safetensors(read_bytes(fs, path)), True
    except FileNotFoundError:
        tensors, resumed = None, False
    if tensors is None:
        # A class whose images were all unreadable has no rows: it keeps its head through the residual
        # alone (fit_classes), and the run goes on; the run summary names it.
        pr = config.prototypes
        if pr.gallery:  # the record tables only for the gallery: a request per class fewer without it
            stored, records = map(list, zip(*store.read_classes_with_records(classes)))
        else:
            stored, records = store.read_classes(classes), []
        features = [F.reshape(-1, store.dim) for F in stored]  # (n_k·h·w, D) float16
        V, bias = store.head()
        by_p, codes = fit_classes_and_codes(  # every p in one pass over A per NMF update
            features, V[classes], bias[classes], pr.p, top_k=pr.gallery, max_iter=pr.max_iter, tol=pr.tol,
            seed=pr.seed, nonneg=pr.nonneg, solver=pr.solver, residual=pr.residual,
            device=device or step_device(config.compute.fit_gpus, "compute.fit_gpus"),
        )
        # The gallery goes in first: a staged fit (the resume marker) always has its gallery beside it.
        gallery = _group_gallery(config, store, classes, codes, records)
        write_bytes_atomic(fs, _gallery_path(staging, classes), write_gallery(gallery))
        tensors = {f"p{p}.{name}": t for p, fit in by_p.items() for name, t in fit.to_tensors().items()}
        write_bytes_atomic(fs, path, save_safetensors(tensors))
    return _group_fit(classes, _split_by_p(tensors), resumed)


def _gallery_path(staging: str, classes: list[int]) -> str:
    return join(staging, group_stem(classes) + ".gallery.parquet")


def _group_gallery(config: Config, store: FeatureStore, classes: list[int], codes: dict[int, TopCodes],
                   records: list[pa.Table]) -> pa.Table:
    """The gallery rows of ``classes`` (:mod:`protonmf.prototypes.gallery`): the images the largest
    E entries name are read again (only those), for their size and the patches' pixels.
    ``records``: each class's record table, as read with its features (none without a gallery)."""
    if config.prototypes.gallery == 0:
        return GALLERY_SCHEMA.empty_table()
    source = make_split_source(config, "train", labels=classes)
    by_id = {r.image_id: r for r in source.records}

    def load(image_id: str):
        record = by_id.get(image_id)
        return (None, "no longer in the training data") if record is None else source.load(record)

    return gallery_table(codes, classes, records, load, make_preprocess(config), store.grid)


def _group_fit(classes: list[int], by_p: dict[int, ClassPrototypes], resumed: bool) -> GroupFit:
    return GroupFit(
        classes=list(classes),
        feature_error={p: f.feature_error.tolist() for p, f in by_p.items()},
        head_error={p: f.head_error.tolist() for p, f in by_p.items()},
        n_iter={p: f.n_iter.tolist() for p, f in by_p.items()},
        resumed=resumed,
        no_images=[k for k, n in zip(classes, next(iter(by_p.values())).n_rows.tolist()) if n == 0],
    )


def published_fits(config: Config, store: FeatureStore, groups: list[list[int]]) -> list[GroupFit] | None:
    """The fits of ``groups`` read from the published model if it comes from this fit key, else None.

    A finished run's rerun needs nothing else: its staging files went when it published.
    """
    if published_key(config.storage.model, "fit_key", config.storage.storage_options or None) != fit_key(config, store):
        return None
    model = PrototypeModel.load(config.storage.model, storage_options=config.storage.storage_options or None)
    fits = {p: model.with_p(p).prototypes.to_tensors() for p in config.prototypes.p}  # per class: (K, ...)

    def group_of(classes: list[int]) -> dict[int, ClassPrototypes]:
        return {p: ClassPrototypes.from_tensors({name: t[classes] for name, t in f.items()}) for p, f in fits.items()}

    return [_group_fit(g, group_of(g), resumed=True) for g in groups]


def _split_by_p(tensors: dict[str, torch.Tensor]) -> dict[int, ClassPrototypes]:
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        p, field_name = name.split(".", 1)
        groups.setdefault(int(p[1:]), {})[field_name] = t
    return {p: ClassPrototypes.from_tensors(g) for p, g in groups.items()}


def held_out_data(config: Config) -> dict[str, Any]:
    """The run's data config without what only training reads: enough for ``protonmf evaluate
    MODEL_URI`` to find the held-out images again (source, val, classes, preprocess,
    val_images_per_class; n_classes and seed for the synthetic set and the digits)."""
    return config.data.model_dump(mode="json", exclude={"train", "max_images_per_class"})


def publish_model(config: Config, backbone: FeatureBackbone, store: FeatureStore) -> str:
    """Merge every staged group into one artifact at ``storage.model`` (manifest written last).

    If the artifact there already comes from the same fit key, it is kept as it is.
    """
    key = fit_key(config, store)
    uri, opts = config.storage.model, config.storage.storage_options or None
    if published_key(uri, "fit_key", opts) == key:
        return uri
    fs, staging = staging_dir(uri, key, opts)
    groups = class_groups(len(store.class_names), config.prototypes.classes_per_task)

    def staged(classes: list[int]) -> tuple[dict[int, ClassPrototypes], pa.Table]:
        path = join(staging, group_stem(classes) + ".safetensors")
        try:
            tensors = load_safetensors(read_bytes(fs, path))
        except FileNotFoundError:
            raise FileNotFoundError(f"the fit of classes {classes[0]}–{classes[-1]} is missing at {path}") from None
        return _split_by_p(tensors), read_gallery(read_bytes(fs, _gallery_path(staging, classes)))

    read = concurrently(staged, groups)  # several groups' files in flight
    fits = [ClassPrototypes.concat([by_p[p] for by_p, _ in read]) for p in config.prototypes.p]
    gallery = pa.concat_tables([g for _, g in read])
    model = PrototypeModel.from_prototypes(
        backbone.cpu(),
        fits,
        store.class_names,
        preprocess=make_preprocess(config).to_dict(),
        settings={**_settings(config), "p": list(config.prototypes.p), "fit_key": key, "features": store.uri,
                  "weights_sha256": weights_sha256(backbone.model), "data": held_out_data(config),
                  "gallery": config.prototypes.gallery},
        gallery=gallery,
    )
    model.save(uri, keep_versions=config.storage.keep_versions, storage_options=opts)  # a new version, then the pointer
    fs.rm(staging, recursive=True)
    return uri


def load_published_model(config: Config) -> PrototypeModel:
    """The run's published model, where the run's forward passes over images go (like the
    extraction): CUDA if ``compute.extract_gpus`` > 0 (the Ray task asks for as many), else the CPU."""
    device = step_device(config.compute.extract_gpus, "compute.extract_gpus")
    return PrototypeModel.load(config.storage.model, storage_options=config.storage.storage_options or None,
                               map_location=device)


def evaluation_shards(config: Config, n_records: int) -> list[tuple[int, int]]:
    """The held-out records ``[start, stop)`` of each evaluation shard: ``evaluation.shard_images``
    records, rounded up to a multiple of ``compute.batch_size`` (so merged shards give one pass's numbers)."""
    return held_out_shards(n_records, config.evaluation.shard_images, config.compute.batch_size)


def evaluate_shard(config: Config, model: PrototypeModel, source: ImageSource, start: int, stop: int) -> HeldOutStats:
    """The held-out statistics of ``source.records[start:stop]`` (merge them with
    :func:`~protonmf.evaluation.held_out.merge_held_out`)."""
    return accumulate_held_out(model, source, make_preprocess(config), records=source.records[start:stop],
                               batch_size=config.compute.batch_size)


def evaluate_run(config: Config, source: ImageSource, stats: HeldOutStats | None = None) -> dict[str, Any]:
    """Evaluate the run's published model on held-out images; write the HTML report beside it.

    ``stats``: the merged statistics of every held-out image when shards of them were measured
    elsewhere (:func:`evaluate_shard`); without them every image is measured here. Then the
    reconstruction study and the report, on the device of :func:`load_published_model`.
    """
    from protonmf.viz.report import render_report

    opts = config.storage.storage_options or None
    model = load_published_model(config)
    if stats is None:
        stats = evaluate_shard(config, model, source, 0, len(source.records))
    ev = config.evaluation
    store = FeatureStore.open(config.storage.features, storage_options=opts) if ev.reconstruction_classes else None
    result = finish_evaluation(model, summarize_held_out(stats, repr(source)), source, store=store,
                               study_classes=ev.reconstruction_classes)
    if ev.report:
        page = render_report(model, result, source, reconstruction=result.get("reconstruction"),
                             classes=list(range(min(ev.report_classes, model.num_classes))),
                             title=f"Prototype model: {config.backbone.arch}")
        result["report"] = attach_file(config.storage.model, model.version, "report/index.html", page.encode(),
                                       storage_options=opts)
    return result
