"""Concept attribution maps (CRAFT §3.4): where each concept of a bank lies in an image.

For an image x with feature map F = g(x) (h, w, D) and a concept bank W (r, D):

- ``"nnls"`` (forward): each position encoded against the bank, U_hw = argmin_{u≥0} ||F_hw − u W||²;
  map_i = U_hw,i. No gradient needed.
- ``"gradcam"`` (backward): the image's concept values u = NNLS(mean_hw F, W) — the encoding CRAFT
  uses for new inputs — differentiated by the implicit function theorem through the NNLS (CRAFT
  eq. 3, :func:`protonmf.nnls.nnls_differentiable`); Grad-CAM at the feature layer:
  α_i = mean_hw ∂u_i/∂F_hw, map_i = ReLU(F_hw · α_i).
- ``"saliency"`` (backward): |∂u_i/∂x| through the NNLS and the whole backbone, max over colour
  channels.

Maps come back at the images' resolution (bilinear upsampling of the h × w grid), one per
concept: (N, r, H, W), non-negative.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as nnf
from torch import Tensor

from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.craft.concepts import encode_positions, pool
from protonmf.nnls import nnls_differentiable

__all__ = ["METHODS", "concept_maps", "concept_values", "maps_from_features"]

Method = Literal["nnls", "gradcam", "saliency"]
METHODS: tuple[str, ...] = ("nnls", "gradcam", "saliency")


def concept_values(features: Tensor, W: Tensor) -> Tensor:
    """u = NNLS(pool(F), W): the concept values of images, differentiable (implicit, CRAFT eq. 3).

    features (N, h, w, D), W (r, D) → (N, r).
    """
    return nnls_differentiable(pool(features), W, method="enumerate" if W.shape[0] <= 10 else "pgd")


def _per_concept_grads(u: Tensor, wrt: Tensor) -> Tensor:
    """(r, *wrt.shape): ∂(Σ_n u_n,i)/∂wrt for each concept i (images are independent)."""
    rows = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    return torch.stack([torch.autograd.grad(u, wrt, grad_outputs=row.expand_as(u), retain_graph=True)[0] for row in rows])


def _check(method: str, W: Tensor, D: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if W.ndim != 2 or W.shape[1] != D:
        raise ValueError(f"W must have shape (r, {D}) for this backbone, got {tuple(W.shape)}")


def maps_from_features(features: Tensor, W: Tensor, size: tuple[int, int], *, method: Method = "nnls") -> Tensor:
    """The "nnls" and "gradcam" maps from feature maps (N, h, w, D) already computed → (N, r, *size)."""
    if method == "saliency":
        raise ValueError("method 'saliency' needs the images: use concept_maps")
    _check(method, W, features.shape[-1])
    F, W = features.detach().clamp_min(0), W.to(device=features.device, dtype=torch.float32)
    if method == "nnls":
        maps = encode_positions(F, W).permute(0, 3, 1, 2)  # (N, r, h, w)
    else:
        with torch.enable_grad():
            F = F.requires_grad_(True)
            grads = _per_concept_grads(concept_values(F, W), F)  # (r, N, h, w, D)
        alpha = grads.mean((2, 3))  # (r, N, D): Grad-CAM weights
        maps = torch.einsum("nhwd,rnd->nrhw", F.detach(), alpha).clamp_min(0)
    return nnf.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False).clamp_min(0)


def concept_maps(backbone: FeatureBackbone, images: Tensor, W: Tensor, *, method: Method = "nnls") -> Tensor:
    """Attribution map of every concept of ``W`` (r, D) on ``images`` (N, 3, H, W) → (N, r, H, W)."""
    _check(method, W, backbone.V.shape[1])
    if method != "saliency":
        with torch.no_grad():
            F = backbone(images)
        return maps_from_features(F, W, images.shape[-2:], method=method)
    W = W.to(device=images.device, dtype=torch.float32)
    with torch.enable_grad():
        x = images.detach().requires_grad_(True)
        grads = _per_concept_grads(concept_values(backbone(x), W), x)  # (r, N, 3, H, W)
    return grads.abs().amax(2).transpose(0, 1).contiguous()
