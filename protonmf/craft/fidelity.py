"""Fidelity of a concept ranking (CRAFT §4.3, Fig. 5): deletion and insertion in concept space.

Given the concept values U of N images, the bank W (r, D) and the rest of the network h from the
bank's layer, rank the concepts (most important first) and rebuild the activations from a subset
of them. U is (N, r) for pooled activations (a root bank, h the linear head on pooled features) or
(N, h, w, r) for per-position codes (a sub-bank at an earlier layer, h = ``LayerCut.logits``):

- deletion: remove the k top-ranked concepts, Ã = (U ⊙ 1[not in top k]) W, k = 0 … r;
- insertion: keep only the k top-ranked concepts, Ã = (U ⊙ 1[in top k]) W.

The curve is the class logit h(Ã)_c averaged over images, rescaled so that no concept gives 0 and
all concepts give 1: y_k = (mean h_c(k) − mean h_c(none)) / (mean h_c(all) − mean h_c(none)).
Deletion starts at 1 and insertion at 0; a faithful ranking makes deletion fall fast (low area
under the curve) and insertion rise fast (high area). Areas are trapezoids over k / r ∈ [0, 1].

Rankings compared: total Sobol indices (CRAFT §3.3) and the TCAV-style ranking (Kim et al.): the
directional derivative of the class logit along each concept at the image's reconstruction U W,

    s_n,i = d/dε h_c(U_n W + ε 1 ⊗ W_i) at ε = 0 = Σ_positions ∂h_c(U_n W)/∂U_n,·,i,

i.e. the concept (a unit-norm row of W, :func:`protonmf.craft.concepts.unit_concepts`) added at
every position; concepts are ordered by their TCAV score (share of images with s_n,i > 0), ties by
the mean s_n,i. Through a linear head on pooled activations s_n,i = W_i · V_c for every image, so
the score is 0 or 1 and the ranking is by W_i · V_c; through the nonlinear rest of a network from
an earlier layer s_n,i varies from image to image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["concept_fidelity", "directional_derivatives", "tcav_ranking"]

Head = Callable[[Tensor], Tensor]


def _check(U: Tensor, W: Tensor) -> None:
    if U.ndim < 2 or W.ndim != 2 or U.shape[-1] != W.shape[0]:
        raise ValueError(f"U and W must have shapes (N, ..., r) and (r, D), got {tuple(U.shape)}, {tuple(W.shape)}")
    if U.shape[0] == 0:
        raise ValueError("U has no images")


def _floating(U: Tensor) -> Tensor:
    return U.detach() if U.is_floating_point() else U.detach().float()


def directional_derivatives(U: Tensor, W: Tensor, head: Head, class_idx: int) -> Tensor:
    """s_n,i = Σ_positions ∂h_c(U_n W)/∂U_n,·,i, the derivative along concept i at every position.

    U (N, r) or (N, h, w, r), W (r, D), head: activations (N, [h, w,] D) → logits (N, K). Returns (N, r).
    """
    _check(U, W)
    with torch.enable_grad():
        u = _floating(U).requires_grad_(True)
        (grad,) = torch.autograd.grad(head(u @ W.to(u))[:, class_idx].sum(), u)  # images are independent
    return grad.flatten(1, -2).sum(1) if grad.ndim > 2 else grad


def tcav_ranking(U: Tensor, W: Tensor, head: Head, class_idx: int) -> tuple[Tensor, Tensor, Tensor]:
    """Concepts ordered by TCAV score, ties by mean directional derivative; returns (order, score, mean).

    score (r,): share of images with s_n,i > 0; mean (r,): mean_n s_n,i (:func:`directional_derivatives`).
    """
    s = directional_derivatives(U, W, head, class_idx)
    score, mean = (s > 0).to(s.dtype).mean(0), s.mean(0)
    by_mean = mean.argsort(descending=True)
    order = by_mean[score[by_mean].argsort(descending=True, stable=True)]  # score first, then the mean
    return order, score, mean


@torch.no_grad()
def concept_fidelity(U: Tensor, W: Tensor, head: Head, class_idx: int, order: Tensor) -> dict[str, Tensor | float]:
    """Deletion and insertion curves of one ranking (``order``: concepts, most important first).

    U (N, r) or (N, h, w, r), W (r, D), head as in :func:`directional_derivatives`.
    Returns {"deletion": (r + 1,), "insertion": (r + 1,), "deletion_auc": float, "insertion_auc": float}.
    """
    _check(U, W)
    r = W.shape[0]
    if sorted(order.tolist()) != list(range(r)):
        raise ValueError(f"order must be a permutation of the {r} concepts, got {order.tolist()}")
    U = _floating(U)
    rank = torch.empty(r, dtype=torch.long)
    rank[order.cpu()] = torch.arange(r)
    k = torch.arange(r + 1).unsqueeze(1)  # (r + 1, 1)
    top = (rank.unsqueeze(0) < k).to(U)  # (r + 1, r): concept in the top k
    masks = torch.cat([1 - top, top])  # deletion rows, then insertion rows
    W = W.to(U)
    # one mask at a time: at an earlier layer Ã is (N, h, w, D) per mask
    y = torch.stack([head((U * m) @ W)[:, class_idx].mean() for m in masks])  # Ã = (U ⊙ mask) W
    deletion, insertion = y[: r + 1], y[r + 1 :]
    full, none = deletion[0], insertion[0]
    span = full - none if float((full - none).abs()) > 1e-12 else torch.ones_like(full)
    deletion, insertion = (deletion - none) / span, (insertion - none) / span
    x = torch.linspace(0, 1, r + 1, dtype=y.dtype)
    return {
        "deletion": deletion.cpu(),
        "insertion": insertion.cpu(),
        "deletion_auc": float(torch.trapezoid(deletion.cpu(), x)),
        "insertion_auc": float(torch.trapezoid(insertion.cpu(), x)),
    }
