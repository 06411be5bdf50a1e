"""CRAFT (Fel et al.): concepts of a class from crops of the images the model predicts as it.

Notation. CRAFT writes A ≈ U Wᵀ with W (D, r); we keep :mod:`protonmf.nmf`'s row convention:
``A`` (M, D) pooled activations of M crops, ``U`` (M, r) concept coefficients (NMF's E),
``W`` (r, D) the concept bank, one concept per row (NMF's B), so A ≈ U W.

1. Images the model *predicts* as class c (CRAFT §3.1), cut into crops resized back to the input
   size (:func:`crop_images`), activations at the feature layer, averaged over positions (CNNs).
2. NMF of A (the core batched NMF) gives U and W (:func:`extract_concepts`).
3. New inputs are encoded against the fixed bank by NNLS (:func:`encode`).
4. Importance of each concept by total Sobol indices of the class logit under masks on U
   (CRAFT §3.3; :func:`protonmf.sobol.concept_importance`), the rest of the network h being the
   head on pooled activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import roi_align

from protonmf.backbones import FeatureBackbone
from protonmf.nmf import nmf
from protonmf.nnls import nnls
from protonmf.sobol import concept_importance

__all__ = ["Concepts", "crop_images", "encode", "extract_concepts", "pooled_activations"]


def crop_images(images: Tensor, crop: int, *, stride: int | None = None, n_random: int = 0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Square crops of side ``crop``, resized back to the input size (one bilinear pass, roi_align).

    Parameters
    ----------
    images : (N, 3, H, W).
    crop : side of a crop in pixels.
    stride : grid crops every ``stride`` pixels (default ``crop``: non-overlapping); ignored when
        ``n_random`` > 0.
    n_random : if > 0, that many random crops per image instead of a grid (seeded).

    Returns
    -------
    crops : (M, 3, H, W); boxes : (M, 5) float, rows (image index, x0, y0, x1, y1).
    """
    N, _, H, W = images.shape
    if not 1 <= crop <= min(H, W):
        raise ValueError(f"crop must be in [1, {min(H, W)}], got {crop}")
    if n_random > 0:
        g = torch.Generator().manual_seed(seed)
        x0 = torch.randint(0, W - crop + 1, (N, n_random), generator=g).float()
        y0 = torch.randint(0, H - crop + 1, (N, n_random), generator=g).float()
        idx = torch.arange(N).repeat_interleave(n_random).float()
        x0, y0 = x0.flatten(), y0.flatten()
    else:
        step = stride or crop
        ys = torch.arange(0, H - crop + 1, step).float()
        xs = torch.arange(0, W - crop + 1, step).float()
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        k = gy.numel()
        idx = torch.arange(N).repeat_interleave(k).float()
        y0, x0 = gy.flatten().repeat(N), gx.flatten().repeat(N)
    boxes = torch.stack([idx, x0, y0, x0 + crop, y0 + crop], 1).to(images)
    crops = roi_align(images, boxes, output_size=(H, W), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return crops, boxes


@torch.no_grad()
def pooled_activations(backbone: FeatureBackbone, images: Tensor, *, batch_size: int = 64) -> Tensor:
    """Feature-layer activations averaged over positions, negatives set to 0: (N, D)."""
    out = [backbone(images[i : i + batch_size]).flatten(1, 2).mean(1) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out).clamp_min(0)


@dataclass(frozen=True)
class Concepts:
    """The concept bank of one class.

    Attributes
    ----------
    class_idx : the class.
    W : (r, D) the concepts (rows).
    U : (M, r) coefficients of the M crops the bank was learned from.
    boxes : (M, 5) where each crop came from (image index in ``image_ids``, x0, y0, x1, y1).
    image_ids : indices (into the images given) of the images predicted as the class.
    importance : (r,) total Sobol index of each concept for the class logit.
    relative_error : ||A − UW||² / ||A||² of the crops' activations.
    """

    class_idx: int
    W: Tensor
    U: Tensor
    boxes: Tensor
    image_ids: Tensor
    importance: Tensor
    relative_error: float


@torch.no_grad()
def extract_concepts(
    backbone: FeatureBackbone,
    images: Tensor,
    class_idx: int,
    n_concepts: int,
    *,
    crop: int,
    stride: int | None = None,
    n_random: int = 0,
    n_design: int = 32,
    seed: int = 0,
    batch_size: int = 64,
) -> Concepts:
    """CRAFT steps 1–4 for one class (see the module docstring).

    ``images`` (N, 3, H, W) are candidate images; only those the black box predicts as
    ``class_idx`` are used (CRAFT §3.1). Raises ValueError if there are none.
    """
    feats = [backbone(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    pred = torch.cat([backbone.head_logits(F) for F in feats]).argmax(1)
    chosen = (pred == class_idx).nonzero().flatten()
    if chosen.numel() == 0:
        raise ValueError(f"no image is predicted as class {class_idx}: CRAFT learns concepts from predicted images")
    crops, boxes = crop_images(images[chosen], crop, stride=stride, n_random=n_random, seed=seed)
    A = pooled_activations(backbone, crops, batch_size=batch_size)  # (M, D)
    res = nmf(A, n_concepts, seed=seed)
    V, bias = backbone.V.detach(), backbone.bias.detach()

    def head(activations: Tensor) -> Tensor:  # h: the rest of the network after pooling
        return activations @ V.T.to(activations) + bias.to(activations)

    importance = concept_importance(res.E, res.B, head, class_idx, n_design=n_design, seed=seed)
    boxes = boxes.clone()
    boxes[:, 0] = chosen[boxes[:, 0].long()].to(boxes)
    return Concepts(class_idx, res.B, res.E, boxes, chosen, importance, float(res.relative_error))


def encode(activations: Tensor, W: Tensor) -> Tensor:
    """U = argmin_{U ≥ 0} ||A − U W||² against a fixed concept bank (CRAFT's encoding of new inputs).

    activations (M, D), W (r, D) → U (M, r).
    """
    return nnls(activations.clamp_min(0), W)
