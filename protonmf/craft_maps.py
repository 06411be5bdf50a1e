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

from protonmf.backbones import FeatureBackbone
from protonmf.craft import encode_positions
from protonmf.nnls import nnls_differentiable

__all__ = ["METHODS", "concept_maps", "concept_values"]

Method = Literal["nnls", "gradcam", "saliency"]
METHODS: tuple[str, ...] = ("nnls", "gradcam", "saliency")


def concept_values(features: Tensor, W: Tensor) -> Tensor:
    """u = NNLS(mean_hw F, W): the concept values of images, differentiable (implicit, CRAFT eq. 3).

    features (N, h, w, D), W (r, D) → (N, r).
    """
    return nnls_differentiable(features.clamp_min(0).flatten(1, 2).mean(1), W, method="enumerate" if W.shape[0] <= 10 else "pgd")


def _per_concept_grads(u: Tensor, wrt: Tensor) -> Tensor:
    """(r, *wrt.shape): ∂(Σ_n u_n,i)/∂wrt for each concept i (images are independent)."""
    rows = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    return torch.stack([torch.autograd.grad(u, wrt, grad_outputs=row.expand_as(u), retain_graph=True)[0] for row in rows])


def concept_maps(backbone: FeatureBackbone, images: Tensor, W: Tensor, *, method: Method = "nnls") -> Tensor:
    """Attribution map of every concept of ``W`` (r, D) on ``images`` (N, 3, H, W) → (N, r, H, W)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if W.ndim != 2 or W.shape[1] != backbone.V.shape[1]:
        raise ValueError(f"W must have shape (r, {backbone.V.shape[1]}) for this backbone, got {tuple(W.shape)}")
    W = W.to(device=images.device, dtype=torch.float32)
    size = images.shape[-2:]
    if method == "nnls":
        with torch.no_grad():
            maps = encode_positions(backbone(images).clamp_min(0), W).permute(0, 3, 1, 2)  # (N, r, h, w)
    elif method == "gradcam":
        with torch.enable_grad():
            F = backbone(images).detach().requires_grad_(True)
            grads = _per_concept_grads(concept_values(F, W), F)  # (r, N, h, w, D)
        alpha = grads.mean((2, 3))  # (r, N, D): Grad-CAM weights
        maps = torch.einsum("nhwd,rnd->nrhw", F.detach(), alpha).clamp_min(0)
    else:
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            grads = _per_concept_grads(concept_values(backbone(x), W), x)  # (r, N, 3, H, W)
        return grads.abs().amax(2).transpose(0, 1).contiguous()
    return nnf.interpolate(maps, size=size, mode="bilinear", align_corners=False).clamp_min(0)
