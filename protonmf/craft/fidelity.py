"""Fidelity of a concept ranking (CRAFT §4.3, Fig. 5): deletion and insertion in concept space.

Given the concept values U (N, r) of N images, the bank W (r, D) and the rest of the network h,
rank the concepts (most important first) and rebuild the activations from a subset of them:

- deletion: remove the k top-ranked concepts, Ã = (U ⊙ 1[not in top k]) W, k = 0 … r;
- insertion: keep only the k top-ranked concepts, Ã = (U ⊙ 1[in top k]) W.

The curve is the class logit h(Ã)_c averaged over images, rescaled so that no concept gives 0 and
all concepts give 1: y_k = (mean h_c(k) − mean h_c(none)) / (mean h_c(all) − mean h_c(none)).
Deletion starts at 1 and insertion at 0; a faithful ranking makes deletion fall fast (low area
under the curve) and insertion rise fast (high area). Areas are trapezoids over k / r ∈ [0, 1].

Rankings compared: total Sobol indices (CRAFT §3.3) and the TCAV-style gradient ranking (Kim et
al.): the directional derivative of the class logit along each concept, s_i = ∂h_c(U W)/∂U_i;
concepts are ordered by their TCAV score (share of images with s_i > 0), ties by the mean s_i.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["concept_fidelity", "tcav_ranking"]

Head = Callable[[Tensor], Tensor]


def _check(U: Tensor, W: Tensor) -> None:
    if U.ndim != 2 or W.ndim != 2 or U.shape[1] != W.shape[0]:
        raise ValueError(f"U and W must have shapes (N, r) and (r, D), got {tuple(U.shape)}, {tuple(W.shape)}")
    if U.shape[0] == 0:
        raise ValueError("U has no images")


def tcav_ranking(U: Tensor, W: Tensor, head: Head, class_idx: int) -> tuple[Tensor, Tensor]:
    """Concepts ordered by TCAV score then mean directional derivative; returns (order, scores)."""
    _check(U, W)
    with torch.enable_grad():
        u = U.detach().to(U.dtype if U.is_floating_point() else torch.float32).requires_grad_(True)
        (s,) = torch.autograd.grad(head(u @ W.to(u))[:, class_idx].sum(), u)  # (N, r): ∂h_c/∂U_i per image
    score = (s > 0).float().mean(0)
    key = score * (1 + s.abs().max()) * 2 + s.mean(0)  # score first, then the mean derivative
    return key.argsort(descending=True), score


@torch.no_grad()
def concept_fidelity(U: Tensor, W: Tensor, head: Head, class_idx: int, order: Tensor) -> dict[str, Tensor | float]:
    """Deletion and insertion curves of one ranking (``order``: concepts, most important first).

    Returns {"deletion": (r + 1,), "insertion": (r + 1,), "deletion_auc": float, "insertion_auc": float}.
    """
    _check(U, W)
    r = W.shape[0]
    if sorted(order.tolist()) != list(range(r)):
        raise ValueError(f"order must be a permutation of the {r} concepts, got {order.tolist()}")
    rank = torch.empty(r, dtype=torch.long)
    rank[order.cpu()] = torch.arange(r)
    k = torch.arange(r + 1).unsqueeze(1)  # (r + 1, 1)
    top = (rank.unsqueeze(0) < k).to(U)  # (r + 1, r): concept in the top k
    masks = torch.cat([1 - top, top])  # deletion rows, then insertion rows
    A = (U.unsqueeze(0) * masks.unsqueeze(1)) @ W.to(U)  # (2(r + 1), N, D): Ã = (U ⊙ mask) W
    y = head(A.flatten(0, 1))[:, class_idx].reshape(2 * (r + 1), -1).mean(1)
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
