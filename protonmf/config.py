"""Run configuration: YAML files in ``configs/`` validated into typed objects.

Unknown keys and wrong types are errors that name the key (``prototypes.p.0: Input should be a
valid integer``). ``--set a.b=value`` overrides any key; the value is read as YAML
(``--set prototypes.p=[1,3]``).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protonmf.craft.settings import CraftSettings

__all__ = ["Config", "ConfigError", "load_config", "parse_config"]


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreprocessConfig(_Section):
    resize: int = Field(256, ge=1)
    crop: int = Field(224, ge=1)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


class DataConfig(_Section):
    source: Literal["imagefolder", "synthetic", "shapes", "digits", "cub", "parquet", "webdataset"] = "synthetic"
    train: str | None = None  # a folder, or for parquet and webdataset also a glob of shards
    val: str | None = None
    classes: list[str] | None = None
    max_images_per_class: int | None = Field(None, ge=1)
    val_images_per_class: int | None = Field(None, ge=1)
    n_classes: int = Field(10, ge=1)  # synthetic and shapes only
    seed: int = 0  # synthetic and digits: which images, and the digits train/val split
    preprocess: PreprocessConfig = PreprocessConfig()
    # Held-out classes are matched to the training classes by name; one the model does not know
    # is an error ("error") or its images are left out and counted ("skip").
    unknown_val_classes: Literal["error", "skip"] = "error"
    # A class whose share of skipped images (not an image, truncated, empty, too large, gone,
    # features not finite) is above this fails, naming its count and the first reasons: a skip is
    # what the bytes show, and more than a few of them is a broken copy of the data, not noise.
    max_skipped_fraction: float = Field(0.01, ge=0, le=1)
    # Set by the run's prepare step, not by hand: the dataset index of each split (one Parquet
    # file next to the feature store), which every worker reads instead of listing the data.
    train_index: str | None = None
    val_index: str | None = None

    #: Keys that say how the data is listed or evaluated, not which features are extracted.
    NOT_IN_FEATURES_KEY: ClassVar[frozenset[str]] = frozenset(
        {"val", "val_images_per_class", "unknown_val_classes", "train_index", "val_index", "max_skipped_fraction"})


class BackboneConfig(_Section):
    arch: str = "protonmf:small_cnn"
    # IMAGENET1K_V1-style enum name, a path or URI of a state dict, null (random init), or "demo":
    # train protonmf:small_cnn on the synthetic set once (cached) and use it.
    weights: str | None = None
    num_classes: int | None = Field(None, ge=1)
    feature_layer: str | None = None
    head: str | None = None
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("arch")
    @classmethod
    def _library_name(cls, v: str) -> str:
        if ":" not in v:
            raise ValueError(f"must be 'library:name' (e.g. 'torchvision:resnet34'), got {v!r}")
        return v


class PrototypesConfig(_Section):
    p: list[int] = Field(default_factory=lambda: [3], min_length=1)
    max_iter: int = Field(200, ge=0)
    tol: float = Field(1e-4, ge=0)
    seed: int = 0
    nonneg: bool = False
    solver: Literal["closed_form", "cvxpy"] = "closed_form"
    # equal: R/Σa on every prototype (ProtoNMF eq. 8); distributed: pieces shaped like each
    # prototype's heatmap (Tan et al. 2024). Only "distributed" enters the fit key.
    residual: Literal["equal", "distributed"] = "equal"
    classes_per_task: int = Field(16, ge=1)
    # Training patches kept per prototype of every fitted p (the largest entries of E; 0: none).
    # Enters the fit key: the gallery is staged and published with the fit it is read from.
    gallery: int = Field(5, ge=0)

    @field_validator("p")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        bad = [q for q in v if q < 1]
        if bad:
            raise ValueError(f"prototype counts must be >= 1, got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"prototype counts must be distinct, got {v}")
        return v


class ComputeConfig(_Section):
    ray_address: str | None = None
    extract_gpus: float = Field(0, ge=0)
    fit_gpus: float = Field(0, ge=0)
    batch_size: int = Field(256, ge=1)
    # The extraction pool grows from what the cluster holds to what it can hold (its GPUs divided
    # by extract_gpus, or its CPUs when extract_gpus is 0); this caps it (null: no cap). Where Ray
    # does not know the cluster's largest size (autoscaler v1) the pool grows up to this.
    max_extract_workers: int | None = Field(None, ge=1)
    precision: Literal["float32", "bfloat16"] = "float32"  # extraction forward pass (bfloat16: GPU workers)
    channels_last: bool = False  # NHWC convolutions in extraction (GPU workers)
    # Reads in flight per decode task (its threads): object storage answers a GET in tens of
    # milliseconds, so a task needs many reads waiting on the network to keep its core decoding.
    read_threads: int = Field(16, ge=1)
    # Prefect's retries of a step after an error that can heal (tasks.runtime.is_retryable); other
    # errors fail at once. 0 leaves only Ray's retries of a task whose worker died.
    retries: int = Field(2, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "workers" in data:
            raise ValueError("compute.workers was removed: the extraction pool sizes itself to the cluster; "
                             "cap it with compute.max_extract_workers")
        return data


class StorageConfig(_Section):
    features: str = "out/features"
    model: str = "out/model"
    concepts: str = "out/concepts"  # the CRAFT concepts artifact (``protonmf craft``)
    keep_versions: int = Field(3, ge=1)  # published versions of the model and of the concepts kept
    storage_options: dict[str, Any] = Field(default_factory=dict)
    # One run at a time per feature store and per model / concepts location (protonmf/lease.py):
    # a second run waits for the first ("wait", up to lease_timeout seconds) or fails naming it
    # ("fail"); a lease not renewed for lease_seconds (its run died) is taken over.
    lease: Literal["wait", "fail"] = "wait"
    lease_seconds: float = Field(120.0, gt=0)
    lease_timeout: float = Field(86400.0, ge=0)
    # A failed read of an image's bytes (throttled, reset, timed out, 5xx) is tried read_attempts
    # times in all, the waits doubling from read_backoff seconds (capped at 20 s, jittered), on top
    # of the client's own retries; then its class fails (and is retried), it is never skipped.
    read_attempts: int = Field(6, ge=1)
    read_backoff: float = Field(0.5, ge=0)
    # A rerun trusts a class whose marker says it was made from the images the listing shows
    # (their ids and ETags or sizes and mtimes) without reading its features; verify: true
    # (``protonmf run --verify``) also reads every such class back against its checksums and
    # extracts again what is damaged. The fit checks what it reads either way.
    verify: bool = False

    @property
    def options(self) -> dict[str, Any] | None:
        """``storage_options`` as fsspec takes them: None for its defaults."""
        return self.storage_options or None


class EvaluationConfig(_Section):
    report: bool = True  # write an HTML report beside the model (<storage.model>/report/index.html)
    report_classes: int = Field(3, ge=0)  # classes shown with their prototype figures
    # The prototype atlas of every class beside the model (<storage.model>/versions/<id>/atlas/),
    # with atlas_images held-out heatmaps per class and prototype (0: galleries and coefficients only).
    atlas: bool = True
    atlas_images: int = Field(3, ge=0)
    reconstruction_classes: int = Field(20, ge=0)  # classes of the Table 1 / Figure 5 study (0: skip)
    # Held-out images per evaluation shard (rounded up to a multiple of compute.batch_size): the
    # shards are spread over as many workers as the extraction would start (tasks/evaluate.py).
    shard_images: int = Field(1024, ge=1)


class CraftConfig(CraftSettings):
    """CRAFT concepts (``protonmf craft``): the method's :class:`~protonmf.craft.settings.CraftSettings`
    and what a run needs around them."""

    max_images_per_class: int = Field(100, ge=1)  # training images predicted as the class
    eval_images_per_class: int = Field(20, ge=1)  # held-out images: fidelity, maps, localization
    top_crops: int = Field(10, ge=1)  # crops kept per concept
    classes_per_task: int = Field(16, ge=1)
    figure_classes: int = Field(3, ge=0)  # classes drawn as PNG sheets


class Config(_Section):
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    prototypes: PrototypesConfig = PrototypesConfig()
    compute: ComputeConfig = ComputeConfig()
    storage: StorageConfig = StorageConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    craft: CraftConfig = CraftConfig()


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def _section_fields(loc: tuple) -> list[str]:
    """The keys allowed where ``loc`` (a path into the config tree) points: its section's fields."""
    model: Any = Config
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _format(err: ValidationError, origin: str, overrides: dict[str, str]) -> str:
    """One line: ``key: what is wrong`` for each error, with a "did you mean" for an unknown key and
    where the value came from (the ``--set`` that gave it, else ``origin``)."""
    parts = []
    for e in err.errors():
        loc = tuple(str(part) for part in e["loc"])
        key = ".".join(loc)
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], _section_fields(loc[:-1]), n=1)
            msg = "unknown key" + (f" (did you mean {'.'.join((*loc[:-1], close[0]))!r}?)" if close else "")
        else:
            msg = e["msg"].removeprefix("Value error, ")
        given = next((item for k, item in overrides.items() if key == k or key.startswith(k + ".")), None)
        parts.append(f"{key}: {msg} ({f'--set {given}' if given else f'in {origin}'})")
    return "; ".join(parts)


def parse_config(tree: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = (), origin: str = "<dict>") -> Config:
    """Validate a config tree with ``key.path=value`` overrides applied on top.

    Raises :class:`ConfigError` in one line naming each bad key, what is wrong with it and where
    it came from (the ``--set`` that gave it, or ``origin``)."""
    tree = dict(tree or {})
    given: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"{key.strip()}: --set {item}: not a YAML value ({err.problem})") from None
        _set(tree, key.strip(), value)
        given[key.strip()] = item
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format(err, origin, given)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (a local path) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return parse_config(tree, overrides, origin=str(path))
