"""A network cut at an inner layer: activations there, and the rest of the network from there.

CRAFT decomposes activations at a layer g and measures concepts through the rest of the network
h (logits = h(g(x))); its recursion (§3.2) goes to an earlier layer g', where h' is no longer the
linear head. :class:`LayerCut` gives both halves of any CNN without rewriting it:

- :meth:`LayerCut.activations` runs the network up to ``layer`` (a forward hook stops it there);
- :meth:`LayerCut.logits` runs the rest: the network is called on a 1-image dummy input and a
  forward hook replaces ``layer``'s output with the given activations (any batch size), so every
  module after the cut runs as the network's own ``forward`` orders it.

A layer is a valid cut only if nothing after it reads an earlier tensor (a skip connection over
the cut); this is checked when the cut is made: h'(g'(x)) must equal the network's logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.backbones.hooks import output_of
from protonmf.devices import to_model

__all__ = ["LayerCut"]


class LayerCut:
    """``backbone``'s network cut after module ``layer`` (a CNN stage giving (B, C, h, w)).

    Parameters
    ----------
    backbone : the black box.
    layer : module name (``layer3``); ``None`` or the backbone's feature layer gives the top cut,
        whose rest is the linear head on pooled features (``backbone.head_logits``).
    image_size : side of the network's input images (for the dummy input and the check).
    """

    def __init__(self, backbone: FeatureBackbone, layer: str | None, image_size: int):
        self.backbone = backbone
        self.top = layer is None or layer == backbone.feature_layer
        self.layer = backbone.feature_layer if self.top else layer
        self.image_size = image_size
        if not self.top:
            modules = dict(backbone.model.named_modules())
            if layer not in modules:
                raise ValueError(f"layer {layer!r} is not a module of {type(backbone.model).__name__}")
            self._module: nn.Module = modules[layer]
            self._check()

    @property
    def device(self) -> torch.device:
        return self.backbone.V.device

    def activations(self, images: Tensor) -> Tensor:
        """Activations at the cut, (B, h, w, C), as the network computes them (not clamped)."""
        if self.top:
            return self.backbone(images)
        out = output_of(self.backbone.model, self._module, images)
        if out.ndim != 4:
            raise ValueError(f"layer {self.layer!r} gives shape {tuple(out.shape)}, not (B, C, h, w)")
        return out.permute(0, 2, 3, 1)

    def logits(self, acts: Tensor) -> Tensor:
        """The rest of the network: activations (B, h, w, C) at the cut → logits (B, K)."""
        if self.top:
            return self.backbone.head_logits(acts)
        dummy = torch.zeros(1, 3, self.image_size, self.image_size, device=acts.device, dtype=acts.dtype)
        replacement = acts.permute(0, 3, 1, 2)
        handle = self._module.register_forward_hook(lambda _m, _i, _o: replacement)
        try:
            return self.backbone.model(dummy)
        finally:
            handle.remove()

    @torch.no_grad()
    def _check(self) -> None:
        x = to_model(torch.randn(2, 3, self.image_size, self.image_size, generator=torch.Generator().manual_seed(0)), self.backbone.V)
        full = self.backbone.model(x)
        cut = self.logits(self.activations(x))
        if cut.shape != full.shape or not torch.allclose(cut, full, rtol=1e-4, atol=1e-4 * float(full.abs().max()) + 1e-6):
            raise ValueError(
                f"layer {self.layer!r} does not cut {type(self.backbone.model).__name__} in two: the rest of the "
                "network does not depend on its output alone (a skip connection crosses it?); choose a whole stage"
            )
