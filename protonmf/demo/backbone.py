"""The demo's black box: ``protonmf:small_cnn`` trained on the synthetic part-annotated set.

:func:`train_demo_backbone` trains the network (:class:`protonmf.backbones.nets.SmallCNN`) on images of
:func:`protonmf.demo.synthetic.make_synthetic_parts`, measures its accuracy on held-out images drawn
from another seed stream, and returns it as a :class:`~protonmf.backbones.FeatureBackbone` whose
spec names the saved weights. Training is deterministic (same arguments, same machine → the same
weights, bit for bit) and cached: the weights are saved as safetensors under a name keyed by a
hash of every training setting and :data:`CODE_VERSION`, with a JSON of the results beside them,
so a second call loads them instead of training again.

The network keeps the shape the ProtoNMF method assumes: ReLU features of ``layer4`` (B, D, 8, 8)
averaged into the linear head ``fc``, so ``backbone.head_logits(backbone(x))`` is the network's
own logits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as nnf
from safetensors.torch import save as save_safetensors
from torch import Tensor

from protonmf.backbones.feature_backbone import BackboneSpec, FeatureBackbone, build_backbone
from protonmf.data.sources import IN_MEMORY_KINDS
from protonmf.demo.synthetic import make_synthetic_parts

__all__ = [
    "CODE_VERSION",
    "DEMO_MEAN",
    "DEMO_STD",
    "DemoBackbone",
    "default_cache_dir",
    "demo_preprocess",
    "preprocess_images",
    "train_demo_backbone",
]

#: Bump whenever a change here (or in ``SmallCNN``, or in the synthetic data) changes the weights
#: that the same arguments give: it is part of the cache key.
CODE_VERSION = 1

ARCH = "protonmf:small_cnn"
#: Fixed normalisation constants (the synthetic images have mean ≈ 0.49, std ≈ 0.14 per channel);
#: the same as the demo config's ``preprocess``.
DEMO_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
DEMO_STD: tuple[float, float, float] = (0.25, 0.25, 0.25)

# Training settings that the public arguments do not expose; all of them go into the cache key.
_HYPER: dict[str, Any] = {
    "batch_size": 64,
    "optimizer": "adamw",
    "lr": 4e-3,
    "weight_decay": 5e-4,
    "schedule": "onecycle",
    "pct_start": 0.25,
    "max_shift": 4,  # augmentation: random translation by up to this many pixels (edge-padded)
    # Weight of the spatial sparsity penalty on the layer4 features (see _spatial_sparsity), ramped
    # up linearly from 0 over the first `sparsity_warmup` of the steps. It makes the features vanish
    # on the background, so that NMF spends its prototypes on the object rather than the backdrop.
    "spatial_sparsity": 0.5,
    "sparsity_warmup": 0.5,
    # Keep the head's weights >= 0 (projected after each step): every class is then a positive
    # combination of feature channels, which the class's NMF prototypes reconstruct well (small
    # residual), so the augmented prototypes' heatmaps stay on the parts.
    "nonneg_head": True,
    "eval_batch_size": 256,
}


@dataclass
class DemoBackbone:
    """The trained demo network and what is known about it.

    Attributes
    ----------
    backbone : FeatureBackbone, in eval mode; ``backbone.spec.weights`` is the safetensors path.
    val_accuracy : float, top-1 accuracy on the held-out synthetic images.
    preprocess : dict, ``{"resize", "crop", "mean", "std"}``, the input transform it was trained with
        (see :func:`preprocess_images`).
    class_names : list of str, one per class, as in :func:`~protonmf.demo.synthetic.make_synthetic_parts`.
    train_seconds : float, wall time of the training run (data, training, evaluation); the time of
        the original run when the weights come from the cache.
    weights_path : str, the safetensors file.
    from_cache : bool, whether this call loaded the weights instead of training.
    config : dict, every setting of the run (the cache key is a hash of it).
    """

    backbone: FeatureBackbone
    val_accuracy: float
    preprocess: dict[str, Any]
    class_names: list[str]
    train_seconds: float
    weights_path: str
    from_cache: bool = False
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> BackboneSpec:
        assert self.backbone.spec is not None
        return self.backbone.spec


#: The demo networks of configs/demo.yaml and configs/digits.yaml, trained once and shipped with
#: the package: training is deterministic on one machine but not across CPUs (float rounding of
#: other kernels), and the demo's numbers in the README must be what every machine prints.
SHIPPED_DIR = Path(__file__).resolve().parent / "weights"


def default_cache_dir() -> Path:
    """``$PROTONMF_CACHE`` if set, else ``~/.cache/protonmf``."""
    env = os.environ.get("PROTONMF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "protonmf"


def demo_preprocess(image_size: int = 64) -> dict[str, Any]:
    """The preprocessing of the demo network at ``image_size``."""
    return {"resize": int(image_size), "crop": int(image_size), "mean": list(DEMO_MEAN), "std": list(DEMO_STD)}


def preprocess_images(images_uint8: np.ndarray, preprocess: dict[str, Any]) -> Tensor:
    """uint8 images (N, H, W, 3) → float32 tensor (N, 3, H', W'), normalised with ``mean``/``std``.

    The images are resized (shorter side to ``resize``) and centre-cropped to ``crop`` only where
    their size differs; the demo's 64×64 images pass through untouched but for the normalisation.
    """
    from torchvision.transforms.v2 import functional as TF

    images = np.asarray(images_uint8)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    resize, crop = preprocess.get("resize"), preprocess.get("crop")
    if resize is not None and min(x.shape[-2:]) != int(resize):
        x = TF.resize(x, [int(resize)], antialias=True)
    if crop is not None and tuple(x.shape[-2:]) != (int(crop), int(crop)):
        x = TF.center_crop(x, [int(crop), int(crop)])
    x = TF.to_dtype(x, torch.float32, scale=True)
    return TF.normalize(x, mean=[float(m) for m in preprocess["mean"]], std=[float(s) for s in preprocess["std"]])


def _stream_seed(seed: int, stream: int) -> int:
    """Independent integer seeds for the training (0) and validation (1) images of one ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(stream)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _config(n_classes, n_train_per_class, n_val_per_class, image_size, seed, epochs, dataset="synthetic") -> dict[str, Any]:
    if dataset not in IN_MEMORY_KINDS:
        raise ValueError(f"dataset must be one of {IN_MEMORY_KINDS}, got {dataset!r}")
    if dataset == "digits" and int(n_classes) != 10:
        raise ValueError(f"n_classes must be 10 for the digits, got {n_classes}")
    return {
        "code_version": CODE_VERSION,
        "dataset": dataset,
        "arch": ARCH,
        "n_classes": int(n_classes),
        "n_train_per_class": int(n_train_per_class),
        "n_val_per_class": int(n_val_per_class),
        "image_size": int(image_size),
        "seed": int(seed),
        "epochs": int(epochs),
        "preprocess": demo_preprocess(image_size),
        **_HYPER,
    }


def _cache_key(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers see no file or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels (edge padding): a light augmentation."""
    if max_shift <= 0:
        return x
    n, _, H, W = x.shape
    padded = nnf.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + H, dx : dx + W] for i, (dy, dx) in enumerate(offsets)])


def _spatial_sparsity(F: Tensor) -> Tensor:
    """Mean over images of mean_hw(n) / sqrt(mean_hw(n²)), n = the L1 norm of each position's features.

    It lies in [1/sqrt(h·w), 1]: 1 when every position is equally active, small when few positions
    carry all the activation; it does not change when the features are scaled.
    """
    n = F.flatten(2).sum(1)  # (B, h·w), F >= 0 after the ReLU
    return (n.mean(1) / n.square().mean(1).add(1e-12).sqrt()).mean()


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(1, x.shape[0])


def _training_data(config: dict[str, Any]):
    """((train images, labels), (val images, labels), class names) of the configured data set.

    "synthetic" (the creatures) and "shapes" (:mod:`protonmf.demo.shapes`): the part sets, train and
    val from independent seed streams; "digits": scikit-learn's
    digits with :class:`protonmf.data.DigitsSource`'s stratified 80/20 split (images per class are
    fixed by the data set there).
    """
    n_classes, size, seed = config["n_classes"], config["image_size"], config["seed"]
    if config["dataset"] == "digits":
        from protonmf.data import DigitsSource

        def arrays(split: str):
            source = DigitsSource(split=split, image_size=size, seed=seed)
            images = np.stack([np.asarray(source.load(r)[0]) for r in source.records])
            return images, np.array([r.label for r in source.records], dtype=np.int64), source.classes

        train_images, train_labels, names = arrays("train")
        val_images, val_labels, _ = arrays("val")
        return (train_images, train_labels), (val_images, val_labels), list(names)
    if config["dataset"] == "shapes":
        from protonmf.demo.shapes import make_shapes as make
    else:
        make = make_synthetic_parts
    train = make(n_classes, config["n_train_per_class"], image_size=size, seed=_stream_seed(seed, 0))
    val = make(n_classes, config["n_val_per_class"], image_size=size, seed=_stream_seed(seed, 1))
    return (train.images, train.labels), (val.images, val.labels), list(train.class_names)


def _train(config: dict[str, Any], log: Callable[[str], None] | None = None) -> tuple[dict[str, Tensor], float, list[str]]:
    """Train the network of ``config``; returns its state dict, val accuracy and class names."""
    n_classes, seed = config["n_classes"], config["seed"]
    (train_images, train_labels), (val_images, val_labels), class_names = _training_data(config)
    pre = config["preprocess"]
    x_train, y_train = preprocess_images(train_images, pre), torch.from_numpy(train_labels)
    x_val, y_val = preprocess_images(val_images, pre), torch.from_numpy(val_labels)

    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        model = build_backbone(BackboneSpec(ARCH, num_classes=n_classes)).model
    if config["nonneg_head"]:
        with torch.no_grad():
            model.fc.weight.clamp_(min=0)
    gen = torch.Generator().manual_seed(seed)  # data order and augmentation

    n, bs, epochs = x_train.shape[0], config["batch_size"], config["epochs"]
    total_steps = epochs * math.ceil(n / bs)
    warmup_steps = config["sparsity_warmup"] * total_steps
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config["lr"], total_steps=total_steps, pct_start=config["pct_start"])
    captured: list[Tensor] = []
    hook = model.layer4.register_forward_hook(lambda _m, _i, out: captured.append(out))
    step = 0
    try:
        for epoch in range(epochs):
            model.train()
            total = 0.0
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, bs):
                idx = order[i : i + bs]
                xb = _shift(x_train[idx], config["max_shift"], gen)
                captured.clear()
                loss = nnf.cross_entropy(model(xb), y_train[idx])
                step += 1
                if config["spatial_sparsity"] > 0:
                    ramp = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
                    loss = loss + ramp * config["spatial_sparsity"] * _spatial_sparsity(captured[0])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if config["nonneg_head"]:
                    with torch.no_grad():
                        model.fc.weight.clamp_(min=0)
                total += float(loss.detach())
            if log is not None:
                acc = _accuracy(model, x_val, y_val, config["eval_batch_size"])
                log(f"epoch {epoch}: loss {total / math.ceil(n / bs):.4f}, val accuracy {acc:.4f}")
    finally:
        hook.remove()
    model.eval()
    acc = _accuracy(model, x_val, y_val, config["eval_batch_size"])
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return state, acc, class_names


def train_demo_backbone(
    n_classes: int = 10,
    n_train_per_class: int = 300,
    n_val_per_class: int = 100,
    image_size: int = 64,
    seed: int = 0,
    epochs: int = 10,
    cache_dir: str | os.PathLike | None = None,
    dataset: str = "synthetic",
) -> DemoBackbone:
    """The demo network, trained on the synthetic part set (or loaded from the cache).

    Parameters
    ----------
    n_classes : int, number of synthetic classes (1 to 125).
    n_train_per_class, n_val_per_class : int, images per class for training and for the held-out
        accuracy (drawn from independent seed streams of ``seed``).
    image_size : int, side of the square images (the network is made for 64).
    seed : int, fixes the data, the initialisation, the data order and the augmentation.
    epochs : int, passes over the training images (one-cycle schedule over all of them).
    cache_dir : directory for ``demo_backbone-<hash>.safetensors`` and its ``.json``; default
        :func:`default_cache_dir`.

    Returns
    -------
    DemoBackbone, whose ``backbone.spec`` is ``BackboneSpec("protonmf:small_cnn",
    num_classes=n_classes, weights=<the safetensors path>)``.
    """
    config = _config(n_classes, n_train_per_class, n_val_per_class, image_size, seed, epochs, dataset)
    if config["n_classes"] < 1 or config["n_train_per_class"] < 1 or config["n_val_per_class"] < 1 or config["epochs"] < 1:
        raise ValueError("n_classes, n_train_per_class, n_val_per_class and epochs must all be >= 1")
    cache = Path(os.path.abspath(Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()))
    stem = f"demo_backbone-{_cache_key(config)}"
    weights_path, info_path = cache / f"{stem}.safetensors", cache / f"{stem}.json"

    info = None
    if cache_dir is None:  # the shipped network of this very configuration, if there is one
        shipped = SHIPPED_DIR / f"{stem}.safetensors", SHIPPED_DIR / f"{stem}.json"
        info = _read_info(*shipped, config)
        if info is not None:
            weights_path = shipped[0]
    if info is None:
        info = _read_info(weights_path, info_path, config)
    from_cache = info is not None
    if info is None:
        info = _train_and_cache(config, stem, weights_path, info_path)

    spec = BackboneSpec(ARCH, num_classes=config["n_classes"], weights=str(weights_path))
    backbone = build_backbone(spec)
    return DemoBackbone(
        backbone=backbone,
        val_accuracy=float(info["val_accuracy"]),
        preprocess=dict(info["preprocess"]),
        class_names=list(info["class_names"]),
        train_seconds=float(info["train_seconds"]),
        weights_path=str(weights_path),
        from_cache=from_cache,
        config=config,
    )


def _train_and_cache(config: dict[str, Any], stem: str, weights_path: Path, info_path: Path) -> dict[str, Any]:
    """Train the network of ``config``, save its weights and the run's JSON; return that JSON's dict.

    The weights go to ``weights_path`` (safetensors, metadata ``cache_key = stem``), the JSON
    (accuracy, preprocessing, class names, timing, config, the weights' sha256) to ``info_path``.
    """
    start = time.perf_counter()
    state, acc, class_names = _train(config)
    seconds = time.perf_counter() - start
    blob = save_safetensors(state, metadata={"cache_key": stem})
    _write_atomic(weights_path, lambda tmp: tmp.write_bytes(blob))
    info = {
        "val_accuracy": acc,
        "preprocess": config["preprocess"],
        "class_names": class_names,
        "train_seconds": seconds,
        "config": config,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "torch_version": torch.__version__,
    }
    # the JSON goes last: weights without it are retrained, never trusted
    _write_atomic(info_path, lambda tmp: tmp.write_text(json.dumps(info, indent=2)))
    return info


def _read_info(weights_path: Path, info_path: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The cached run's JSON if both files are there and agree with each other and ``config``."""
    if not (weights_path.is_file() and info_path.is_file()):
        return None
    try:
        info = json.loads(info_path.read_text())
        if info.get("config") != config or info.get("weights_sha256") != _file_sha256(weights_path):
            return None
    except Exception:  # unreadable or corrupt: train again
        return None
    return info
