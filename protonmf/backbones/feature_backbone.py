"""Backbones: a trained classifier split into a feature map and a linear head.

A :class:`FeatureBackbone` turns images (B, 3, H, W) into features F of shape (B, h, w, D), the
input of the layer that feeds the classifier, and exposes that classifier's head V (K, D) and
bias (K,). Its :meth:`~FeatureBackbone.head_logits` is the black box's decision on pooled
features, mean_hw(F) Vᵀ + bias, which the prototype model reproduces exactly.

- CNNs (torchvision ResNets, ...): F is the last stage's map (ResNet ``layer4``), and
  ``head_logits`` equals the network's own logits.
- Vision transformers: F is the last block's tokens (after the final norm) with the class token
  dropped and the patch tokens reshaped to the patch grid. As in the ProtoNMF paper (Table 3), the
  black box is then the head applied to the *mean* of the patch tokens, not to the class token.

Architectures are named ``library:name`` (``torchvision:resnet34``, ``timm:vit_base_patch32_224``,
``protonmf:tiny_vit``); weights are a library enum name (``IMAGENET1K_V1``), a path or URI of a
state dict (``.pt``/``.pth`` or ``.safetensors``), or None for a random init.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from protonmf.backbones.hooks import output_of
from protonmf.devices import back_to, to_model

__all__ = ["BackboneSpec", "FeatureBackbone", "build_backbone", "is_weights_file", "load_state_dict", "weights_sha256"]


@dataclass(frozen=True)
class BackboneSpec:
    """What to build: enough to rebuild the same network from an artifact's manifest."""

    arch: str
    weights: str | None = None
    num_classes: int | None = None
    feature_layer: str | None = None  # module name; default: the layer that feeds the classifier
    head: str | None = None  # module name of the final nn.Linear; default per family
    arch_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _open(uri: str):
    import fsspec

    return fsspec.open(uri, "rb").open()


def load_state_dict(uri: str) -> dict[str, Tensor]:
    """A state dict from a local path or fsspec URI, as ``.safetensors`` or a torch pickle.

    Raises ValueError naming ``backbone.weights`` and the file if it does not exist or is not a
    checkpoint (a torch pickle or safetensors file of tensors)."""
    try:
        with _open(uri) as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"backbone.weights: {uri!r} does not exist") from None
    try:
        if uri.endswith(".safetensors"):
            from safetensors.torch import load

            return load(data)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and safetensors each fail their own way on other bytes
        reader = "safetensors" if uri.endswith(".safetensors") else "torch.load"
        raise ValueError(f"backbone.weights: {uri!r} is not a checkpoint: {len(data)} bytes that {reader} cannot read "
                         f"({type(err).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint
    if not isinstance(state, dict):
        raise ValueError(f"backbone weights at {uri!r} are not a state dict (got {type(state).__name__})")
    return state


def is_weights_file(weights: str) -> bool:
    """Whether ``backbone.weights`` names a file (a path or URI) rather than weights by name."""
    return "/" in weights or "://" in weights or weights.endswith((".pt", ".pth", ".safetensors", ".bin"))


def _build_model(spec: BackboneSpec) -> nn.Module:
    if ":" not in spec.arch:
        raise ValueError(f"backbone.arch must be 'library:name' (e.g. 'torchvision:resnet34'), got {spec.arch!r}")
    library, name = spec.arch.split(":", 1)
    kwargs = dict(spec.arch_kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    enum_weights = spec.weights if spec.weights and not is_weights_file(spec.weights) else None
    if library == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"backbone.arch: torchvision has no model {name!r}")
        if enum_weights is not None:
            known = sorted(torchvision.models.get_model_weights(name).__members__) + ["DEFAULT"]
            if enum_weights not in known:
                raise ValueError(f"backbone.weights: torchvision {name} has no weights {enum_weights!r}; known: {', '.join(sorted(set(known)))}")
        try:
            model = torchvision.models.get_model(name, weights=enum_weights, **kwargs)
        except OSError as err:  # URLError and friends: the weights are downloaded on first use
            raise ValueError(
                f"backbone.weights: could not fetch torchvision {name} {enum_weights} ({err}); "
                "without network access give a path or URI of the state dict"
            ) from None
    elif library == "timm":
        import timm

        if not timm.is_model(name):
            raise ValueError(f"backbone.arch: timm has no model {name!r}")
        pretrained = enum_weights is not None
        model = timm.create_model(_timm_pretrained_name(name, enum_weights), pretrained=pretrained, **kwargs)
    elif library == "protonmf":
        from protonmf.backbones import nets

        if name not in nets.REGISTRY:
            raise ValueError(f"backbone.arch: protonmf has no model {name!r}; known: {sorted(nets.REGISTRY)}")
        if enum_weights is not None:
            raise ValueError(f"backbone.weights: protonmf:{name} has no published weights; give a path or URI")
        model = nets.REGISTRY[name](**kwargs)
    else:
        raise ValueError(f"backbone.arch: unknown library {library!r} (torchvision, timm or protonmf)")
    if spec.weights and is_weights_file(spec.weights):
        state = load_state_dict(spec.weights)
        _check_state_fits(model, state, spec)
        model.load_state_dict(state)
    return model


def _timm_pretrained_name(name: str, tag: str | None) -> str:
    """``name.tag``, timm's way of choosing one pretrained checkpoint; a tag timm does not know is an error."""
    if tag is None or tag == "default":
        return name
    import timm

    known = sorted(n.split(".", 1)[1] for n in timm.list_pretrained(f"{name}.*") if n.split(".", 1)[0] == name)
    if tag not in known:
        raise ValueError(f"backbone.weights: timm {name} has no pretrained tag {tag!r}; known: {', '.join(known) or 'none'}")
    return f"{name}.{tag}"


def _check_state_fits(model: nn.Module, state: dict[str, Tensor], spec: BackboneSpec) -> None:
    """A checkpoint for another network is an error naming the file and the layers that differ."""
    own = model.state_dict()
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})" for k, v in own.items() if k in state and state[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if shapes or missing or unexpected:
        parts = [f"{len(shapes)} with another shape: {', '.join(shapes[:5])}" if shapes else "",
                 f"{len(missing)} missing: {', '.join(missing[:5])}" if missing else "",
                 f"{len(unexpected)} unexpected: {', '.join(unexpected[:5])}" if unexpected else ""]
        raise ValueError(f"backbone.weights {spec.weights!r} do not fit {spec.arch}: layers " + "; ".join(p for p in parts if p))


def weights_sha256(model: nn.Module) -> str:
    """The sha256 of a network's weights (names, dtypes, shapes and bytes, in name order): what
    identifies a black box, whatever file or name its weights came from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _default_layers(model: nn.Module) -> tuple[str, str, bool]:
    """(feature layer, head, is_token_model) for the families we know."""
    names = dict(model.named_modules())
    if "encoder" in names and "heads.head" in names:  # torchvision VisionTransformer
        return "encoder", "heads.head", True
    if hasattr(model, "num_prefix_tokens") and hasattr(model, "forward_features"):  # timm ViT family
        return "", _timm_head(model), True
    if hasattr(model, "forward_features") and hasattr(model, "get_classifier"):  # timm CNNs
        return "", _timm_head(model), False
    if "layer4" in names and "fc" in names:  # torchvision ResNet / ResNeXt / Wide ResNet
        return "layer4", "fc", False
    if "features" in names and "classifier" in names:  # torchvision VGG / DenseNet / EfficientNet style
        return "features", _last_linear(model, "classifier"), False
    raise ValueError(
        f"cannot tell the feature layer and head of {type(model).__name__}: set backbone.feature_layer and backbone.head"
    )


def _timm_head(model: nn.Module) -> str:
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier:
            return name
    raise ValueError(f"timm model {type(model).__name__} has no named classifier")


def _last_linear(model: nn.Module, prefix: str) -> str:
    linears = [n for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"no nn.Linear under {prefix!r}")
    return linears[-1]


class FeatureBackbone(nn.Module):
    """Images → feature maps F (B, h, w, D), with the classifier head V (K, D), bias (K,).

    Build it with :func:`build_backbone` from a :class:`BackboneSpec`, or wrap a model object with
    :meth:`from_model`.
    """

    def __init__(
        self,
        model: nn.Module,
        feature_layer: str,
        head: str,
        tokens: bool,
        spec: BackboneSpec | None = None,
    ):
        super().__init__()
        self.model = model.eval()
        self.spec = spec
        self.feature_layer = feature_layer
        self.head_name = head
        self.tokens = tokens
        modules = dict(model.named_modules())
        if head not in modules or not isinstance(modules[head], nn.Linear):
            raise ValueError(f"backbone.head {head!r} is not an nn.Linear of {type(model).__name__}")
        if feature_layer and feature_layer not in modules:
            raise ValueError(f"backbone.feature_layer {feature_layer!r} is not a module of {type(model).__name__}")
        self._head = modules[head]
        self._layer = modules[feature_layer] if feature_layer else None
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1)) if tokens else 0

    @classmethod
    def from_model(
        cls, model: nn.Module, *, feature_layer: str | None = None, head: str | None = None, spec: BackboneSpec | None = None
    ) -> "FeatureBackbone":
        """Wrap a classifier; the feature layer and head default to its family's (see module doc)."""
        try:
            default_layer, default_head, tokens = _default_layers(model)
        except ValueError:
            if feature_layer is None or head is None:
                raise
            default_layer, default_head, tokens = "", "", False
        return cls(
            model,
            feature_layer if feature_layer is not None else default_layer,
            head if head is not None else default_head,
            tokens,
            spec,
        )

    @property
    def V(self) -> Tensor:
        """Head weights, shape (K, D)."""
        return self._head.weight.detach()

    @property
    def bias(self) -> Tensor:
        """Head bias, shape (K,) (zeros if the head has none)."""
        b = self._head.bias
        return b.detach() if b is not None else torch.zeros(self.V.shape[0], device=self.V.device, dtype=self.V.dtype)

    @property
    def num_classes(self) -> int:
        return self.V.shape[0]

    @property
    def device(self) -> torch.device:
        """Where the network computes (see :mod:`protonmf.devices`)."""
        return self._head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._head.weight.dtype

    def _raw_features(self, images: Tensor) -> Tensor:
        if self._layer is None:  # timm: forward_features is the feature layer
            return self.model.forward_features(images)
        return output_of(self.model, self._layer, images)

    def forward(self, images: Tensor) -> Tensor:
        """Features F of shape (B, h, w, D), not clamped (the NMF clamps its own input).

        ``images`` are moved to the network's device and dtype; F comes back on their device.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        return back_to(self._features(to_model(images, self._head.weight)), images)

    def _features(self, images: Tensor) -> Tensor:
        out = self._raw_features(images)
        if self.tokens:
            patches = out[:, self.num_prefix_tokens :]  # drop the class (and register) tokens
            side = math.isqrt(patches.shape[1])
            if side * side != patches.shape[1]:
                raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid")
            F = patches.reshape(out.shape[0], side, side, out.shape[-1])
        else:
            if out.ndim != 4:
                raise ValueError(f"feature layer {self.feature_layer!r} gives shape {tuple(out.shape)}, not (B, D, h, w)")
            F = out.permute(0, 2, 3, 1)
        if F.shape[-1] != self.V.shape[1]:
            raise ValueError(
                f"feature layer {self.feature_layer!r} has D = {F.shape[-1]} channels but the head "
                f"{self.head_name!r} expects D = {self.V.shape[1]}"
            )
        return F

    def head_logits(self, F: Tensor) -> Tensor:
        """The black box's logits from features: mean_hw(F) Vᵀ + bias, shape (B, K), on F's device."""
        return back_to(to_model(F, self.V).flatten(1, 2).mean(1) @ self.V.T + self.bias, F)

    def spec_dict(self) -> dict[str, Any]:
        base = self.spec.to_dict() if self.spec is not None else {"arch": type(self.model).__name__}
        return {**base, "feature_layer": self.feature_layer, "head": self.head_name}


def build_backbone(spec: BackboneSpec) -> FeatureBackbone:
    """Build the network of ``spec``, load its weights, and wrap it as a :class:`FeatureBackbone`."""
    model = _build_model(spec)
    return FeatureBackbone.from_model(model, feature_layer=spec.feature_layer, head=spec.head, spec=spec)
