"""A baseline basis for the reconstruction comparison of ProtoNMF Table 1 / Figure 5.

ProtoPNet's prototypes are real feature patches ("closest training patch"). Our stand-in: per
class, k-means on the class's feature rows A (n, D), each centroid then snapped to its nearest
actual row, so the p prototypes are p real patches. Like NMF prototypes they reconstruct A with
non-negative codes, min_{E ≥ 0} ||A − E B||², which :func:`basis_error` computes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from protonmf.nnls import nnls

__all__ = ["basis_error", "patch_prototypes"]


@torch.no_grad()
def patch_prototypes(A: Tensor, p: int, *, n_iter: int = 50, seed: int = 0) -> Tensor:
    """p real rows of A (n, D) chosen by k-means (Lloyd, k-means++ start) and snapped to the data.

    Returns
    -------
    B : Tensor of shape (p, D), float32: rows of A (negatives set to 0).
    """
    X = A.float().clamp_min(0)
    n = X.shape[0]
    if not 1 <= p <= n:
        raise ValueError(f"p = {p} patch prototypes need 1 <= p <= n = {n} rows")
    g = torch.Generator().manual_seed(seed)
    centers = X[torch.randint(n, (1,), generator=g)]
    for _ in range(1, p):  # k-means++: next center with probability ∝ squared distance
        d2 = torch.cdist(X, centers).square().min(1).values
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1 / n)
        centers = torch.cat([centers, X[torch.multinomial(probs.cpu(), 1, generator=g).to(X.device)]])
    for _ in range(n_iter):
        assign = torch.cdist(X, centers).argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, assign, X)
        counts = torch.bincount(assign, minlength=p).clamp_min(1).unsqueeze(1)
        new = torch.where(torch.bincount(assign, minlength=p).unsqueeze(1) > 0, sums / counts, centers)
        if torch.equal(new, centers):
            break
        centers = new
    return X[torch.cdist(centers, X).argmin(1)]  # snap: the nearest real patch of each centroid


@torch.no_grad()
def basis_error(A: Tensor, B: Tensor) -> float:
    """min_{E ≥ 0} ||A − E B||² / ||A||² for a fixed basis B (p, D) (eq. 3 with E by NNLS)."""
    X = A.double().clamp_min(0)
    E = nnls(X, B.double())
    return float((X - E @ B.double()).square().sum() / X.square().sum().clamp_min(1e-300))
