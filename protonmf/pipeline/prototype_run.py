"""The steps of a run, as plain functions of a :class:`~protonmf.config.Config`.

``tasks/`` runs these on Ray and ``flows/`` orders them with Prefect; here they know neither, and
a notebook can call them one after the other:

1. :func:`index_data` lists the data once into a dataset index; :func:`prepare_store` opens (or
   resumes) the feature store of the run.
2. :func:`extract_group` extracts the features of some classes into it (in one process; on Ray
   :func:`decode_group` decodes on CPUs and :func:`forward_group` forwards and writes).
3. :func:`fit_group` fits the prototypes of some classes (every p) into a staging file.
4. :func:`publish_model` merges the staged groups into one model artifact, manifest last.
5. :func:`evaluate_run` compares the published model with its black box on held-out images.

Everything a step writes is keyed by a hash of the settings it depends on, so a rerun resumes:
complete classes and groups are read, not recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from protonmf.backbones.feature_backbone import BackboneSpec, FeatureBackbone, build_backbone
from protonmf.config import Config
from protonmf.data import ImageSource, Preprocess
from protonmf.evaluation.published import evaluate_published_model
from protonmf.data.extract import ClassExtraction, DecodedClass, decode_class, extract_classes, extract_decoded
from protonmf.data.sources.shards import shard_folder
from protonmf.pipeline.datasets import index_data, make_split_source
from protonmf.pipeline.staging import class_groups, group_stem, published_key, run_key, staging_dir
from protonmf.prototypes.fit import ClassPrototypes, fit_prototypes_sweep, fit_settings, stack_classes
from protonmf.prototypes.model import PrototypeModel
from protonmf.storage import join, read_bytes, to_fs, write_bytes_atomic
from protonmf.data.store import FeatureStore

__all__ = [
    "GroupFit",
    "class_groups",
    "decode_group",
    "evaluate_run",
    "extract_group",
    "fit_group",
    "fit_key",
    "forward_group",
    "index_data",
    "load_backbone",
    "make_preprocess",
    "make_split_source",
    "preflight",
    "prepare_store",
    "publish_model",
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

    ``weights: demo`` becomes the path of the trained demo CNN; ``weights: null`` (a random init,
    for tests) is drawn from ``prototypes.seed`` and saved beside the features.
    """
    weights = config.backbone.weights
    if weights is None:
        torch.manual_seed(config.prototypes.seed)
    backbone = load_backbone(config)
    if weights is None:
        fs, root = to_fs(config.storage.features, config.storage.storage_options or None)
        state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
        write_bytes_atomic(fs, join(root, "backbone.safetensors"), save_safetensors(state))
        weights = join(config.storage.features, "backbone.safetensors")
    elif weights == "demo":
        weights = backbone.spec.weights
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
        data=config.data.model_dump(exclude=set(config.data.NOT_IN_FEATURES_KEY)),
        classes=classes,
        **precision,  # bfloat16 features are other features (float32 keeps the keys of earlier stores)
    )


def prepare_store(config: Config, backbone: FeatureBackbone, source: ImageSource) -> FeatureStore:
    """Create the run's feature store, or reopen it if a run with the same settings made it."""
    if len(source.classes) != backbone.num_classes:
        raise ValueError(
            f"data has {len(source.classes)} classes but the backbone's head has {backbone.num_classes} "
            "(set backbone.num_classes or data.classes)"
        )
    h, w, D = _grid(backbone, config.data.preprocess.crop)
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
    return extract_classes(
        backbone, source, make_preprocess(config), store, classes, batch_size=c.batch_size,
        precision=c.precision, channels_last=c.channels_last, **kwargs,
    )


#: Reading threads of one decode task: object storage answers a GET in tens of milliseconds, so a
#: few reads in flight keep the task's one core decoding instead of waiting.
DECODE_THREADS = 4


def decode_group(config: Config, classes: list[int]) -> list[DecodedClass]:
    """Read, decode and crop the images of ``classes`` (the CPU half of extraction), reading only
    their rows of the dataset index."""
    source = make_split_source(config, "train", labels=classes)
    pre = make_preprocess(config)
    return [decode_class(source, pre, k, workers=DECODE_THREADS, batch_size=config.compute.batch_size) for k in classes]


def forward_group(
    config: Config, backbone: FeatureBackbone, store: FeatureStore, decoded: list[DecodedClass],
) -> list[ClassExtraction]:
    """Forward decoded classes and write each to the store (the GPU half of extraction)."""
    c = config.compute
    return [
        extract_decoded(backbone, d, make_preprocess(config), store, batch_size=c.batch_size,
                        precision=c.precision, channels_last=c.channels_last)
        for d in decoded
    ]


def fit_key(config: Config, store: FeatureStore) -> str:
    pr = config.prototypes
    return run_key(features=store.key, p=pr.p, settings=_settings(config))


def _settings(config: Config) -> dict[str, Any]:
    pr = config.prototypes
    return fit_settings(max_iter=pr.max_iter, tol=pr.tol, seed=pr.seed, nonneg=pr.nonneg, solver=pr.solver)


@dataclass(frozen=True)
class GroupFit:
    """What fitting one group of classes did (small, returned by workers)."""

    classes: list[int]
    feature_error: dict[int, list[float]]  # p -> per class ||A − EB||² / ||A||²
    head_error: dict[int, list[float]]  # p -> per class ||V − CB||² / ||V||²
    n_iter: dict[int, list[int]]
    resumed: bool


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def fit_group(config: Config, store: FeatureStore, classes: list[int], *, device: str | None = None) -> GroupFit:
    """Fit every p of the config for ``classes`` from stored features; staged, resumable."""
    key = fit_key(config, store)
    fs, staging = staging_dir(config.storage.model, key, config.storage.storage_options or None)
    path = join(staging, group_stem(classes) + ".safetensors")
    if fs.exists(path):
        tensors = load_safetensors(read_bytes(fs, path))
        resumed = True
    else:
        features = [store.read_class(k).reshape(-1, store.dim) for k in classes]  # (n_k·h·w, D) float16
        if any(F.shape[0] == 0 for F in features):
            empty = [store.class_names[k] for k, F in zip(classes, features) if F.shape[0] == 0]
            raise ValueError(f"classes {empty} have no usable images: cannot fit prototypes for them")
        A, rows = stack_classes(features)
        V, bias = store.head()
        pr = config.prototypes
        fits = fit_prototypes_sweep(  # every p in one pass over A per NMF update
            A, V[classes], bias[classes], pr.p, n_rows=rows, max_iter=pr.max_iter, tol=pr.tol,
            seed=pr.seed, nonneg=pr.nonneg, solver=pr.solver, device=device or _default_device(),
        )
        tensors = {f"p{p}.{name}": t for p, (fit, _) in fits.items() for name, t in fit.to_tensors().items()}
        write_bytes_atomic(fs, path, save_safetensors(tensors))
        resumed = False
    by_p = _split_by_p(tensors)
    return GroupFit(
        classes=list(classes),
        feature_error={p: f.feature_error.tolist() for p, f in by_p.items()},
        head_error={p: f.head_error.tolist() for p, f in by_p.items()},
        n_iter={p: f.n_iter.tolist() for p, f in by_p.items()},
        resumed=resumed,
    )


def _split_by_p(tensors: dict[str, torch.Tensor]) -> dict[int, ClassPrototypes]:
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        p, field_name = name.split(".", 1)
        groups.setdefault(int(p[1:]), {})[field_name] = t
    return {p: ClassPrototypes.from_tensors(g) for p, g in groups.items()}


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
    by_p: dict[int, list[ClassPrototypes]] = {p: [] for p in config.prototypes.p}
    for classes in groups:
        path = join(staging, group_stem(classes) + ".safetensors")
        if not fs.exists(path):
            raise FileNotFoundError(f"the fit of classes {classes[0]}–{classes[-1]} is missing at {path}")
        for p, fit in _split_by_p(load_safetensors(read_bytes(fs, path))).items():
            by_p[p].append(fit)
    fits = [ClassPrototypes.concat(by_p[p]) for p in config.prototypes.p]
    model = PrototypeModel.from_prototypes(
        backbone.cpu(),
        fits,
        store.class_names,
        preprocess=make_preprocess(config).to_dict(),
        settings={**_settings(config), "p": list(config.prototypes.p), "fit_key": key, "features": store.uri},
    )
    model.save(uri, storage_options=opts)  # re-reads every file, manifest last
    fs.rm(staging, recursive=True)
    return uri


def evaluate_run(config: Config, source: ImageSource) -> dict[str, Any]:
    """Evaluate the run's published model on held-out images; write the HTML report beside it."""
    from protonmf.viz.report import render_report

    opts = config.storage.storage_options or None
    model = PrototypeModel.load(config.storage.model, storage_options=opts)
    ev = config.evaluation
    store = FeatureStore.open(config.storage.features, storage_options=opts) if ev.reconstruction_classes else None
    result = evaluate_published_model(model, source, make_preprocess(config), batch_size=config.compute.batch_size,
                                      store=store, study_classes=ev.reconstruction_classes)
    if ev.report:
        page = render_report(model, result, source, reconstruction=result.get("reconstruction"),
                             classes=list(range(min(ev.report_classes, model.num_classes))),
                             title=f"Prototype model: {config.backbone.arch}")
        fs, root = to_fs(config.storage.model, opts)
        write_bytes_atomic(fs, join(root, "report", "index.html"), page.encode())
        result["report"] = join(config.storage.model, "report", "index.html")
    return result
