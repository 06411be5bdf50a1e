"""Batched non-negative least squares: codes of features against a fixed basis.

Notation as in :mod:`protonmf.nmf`: ``X`` of shape (..., n, D) rows to encode, ``B`` of shape
(..., p, D) the basis (rows may have negative entries, e.g. the augmented prototypes of eq. 8, so
the multiplicative updates do not apply), ``E`` of shape (..., n, p) the codes:

    E = argmin_{E ≥ 0} ||X − E B||²        (ProtoNMF eq. 9; CRAFT's encoding of new inputs)

Every row is an independent p-variable quadratic program ½eᵀGe − hᵀe with G = BBᵀ, h = Bx.
Two exact-or-convergent solvers, both vectorized over rows and leading batch axes:

- ``"enumerate"`` (exact, p ≤ 10): the optimum is the stationary point of the active set with the
  lowest objective among those that are non-negative; all 2^p sets are solved at once.
- ``"pgd"``: accelerated projected gradient (FISTA) with step 1/λ_max(G), stopped on the KKT residual.
- ``"cd"``: from ``init``, codes near the optimum (the E an NMF ends with), a few sweeps of
  coordinate descent (the E step of HALS) find each row's active set; the stationary point of
  that one set is then solved exactly and kept where it meets the KKT conditions (which certify
  the optimum of this convex problem); the other rows are solved by ``"enumerate"`` (p ≤ 10) or
  ``"pgd"``. The answer of ``"enumerate"`` at a fraction of its 2^p cost.

:func:`nnls_differentiable` is the same solve with a backward pass by implicit differentiation of
the KKT conditions (CRAFT §3.4): on the active set S = {j : E_j > 0} of a row, G_SS e_S = h_S and
e_j = 0 off S, so with v = (G_SS)⁻¹ (∂L/∂e)_S (zero off S), ∂L/∂x = vB and
∂L/∂B = Σ_rows [v xᵀ − (v eᵀ + e vᵀ) B].
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["nnls", "nnls_differentiable"]

Method = Literal["auto", "enumerate", "pgd", "cd"]
MAX_ENUMERATE_P = 10


def _check(X: Tensor, B: Tensor) -> None:
    if X.ndim < 2 or B.ndim < 2:
        raise ValueError(f"X and B must have shapes (..., n, D) and (..., p, D), got {tuple(X.shape)}, {tuple(B.shape)}")
    if X.shape[-1] != B.shape[-1]:
        raise ValueError(f"feature dimension mismatch: X has D = {X.shape[-1]}, B has D = {B.shape[-1]}")
    if not torch.isfinite(X).all() or not torch.isfinite(B).all():
        raise ValueError("X or B contains NaN or Inf values")


def _enumerate(h: Tensor, G: Tensor, block_rows: int) -> Tensor:
    p = G.shape[-1]
    masks = ((torch.arange(2**p, device=G.device).unsqueeze(1) >> torch.arange(p, device=G.device)) & 1).to(G.dtype)
    Gs = G.unsqueeze(-3) * masks.unsqueeze(-1) * masks.unsqueeze(-2)  # (..., 2^p, p, p): G on the set, 0 off it
    Ginv = torch.linalg.pinv(Gs, hermitian=True)  # stationary point of each active set
    out = torch.empty_like(h)
    n = h.shape[-2]
    for start in range(0, n, block_rows):
        hb = h[..., start : start + block_rows, :]  # (..., nb, p)
        cand = torch.einsum("...np,...spq->...nsq", hb, Ginv)  # (..., nb, 2^p, p)
        objective = -0.5 * (cand * hb.unsqueeze(-2)).sum(-1)  # ½eᵀGe − hᵀe at a stationary point
        tol = 1e-9 * cand.abs().amax((-2, -1), keepdim=True).clamp_min(1e-30)
        feasible = (cand >= -tol).all(-1)
        objective = objective.masked_fill(~feasible, float("inf"))
        best = objective.argmin(-1, keepdim=True)  # (..., nb, 1)
        chosen = torch.gather(cand, -2, best.unsqueeze(-1).expand(*best.shape, p)).squeeze(-2)
        out[..., start : start + block_rows, :] = chosen.clamp_min(0)
    return out


def _kkt_met(E: Tensor, G: Tensor, h: Tensor, tol: float) -> bool:
    """Whether every row meets the KKT conditions at tolerance ``tol`` (:func:`_kkt_rows`)."""
    return bool(_kkt_rows(E, G, h, tol).all())


_CD_SWEEPS = 8  # coordinate sweeps before the active sets are read off


def _kkt_rows(E: Tensor, G: Tensor, h: Tensor, tol: float) -> Tensor:
    """(..., n) bool: the rows of E that meet the KKT conditions at tolerance ``tol`` (relative to
    max |h|): gradient ≥ 0 where E = 0, = 0 where E > 0."""
    grad = E @ G - h
    kkt = torch.where(E > 0, grad.abs(), (-grad).clamp_min(0))
    return (kkt <= tol * h.abs().amax((-2, -1), keepdim=True).clamp_min(1e-30)).all(-1)


def _cd(h: Tensor, G: Tensor, E: Tensor | None, max_iter: int, tol: float, block_rows: int) -> Tensor:
    p = G.shape[-1]
    diag = torch.diagonal(G, dim1=-2, dim2=-1).clamp_min(1e-30).unsqueeze(-2)  # (..., 1, p)
    E = (h / diag).clamp_min(0) if E is None else E.to(h.dtype).clamp_min(0).clone()
    for _ in range(_CD_SWEEPS):
        for j in range(p):
            grad = (E @ G[..., :, j : j + 1]).squeeze(-1) - h[..., j]  # (..., n): ∂/∂E_j of ½eᵀGe − hᵀe
            E[..., j] = (E[..., j] - grad / diag[..., j]).clamp_min(0)
    # The stationary point of each row's active set S: G_SS e_S = h_S, e = 0 off S.
    eye = torch.eye(p, dtype=G.dtype, device=G.device)
    out = torch.empty_like(h)
    n = h.shape[-2]
    for start in range(0, n, block_rows):
        rows = slice(start, start + block_rows)
        on = (E[..., rows, :] > 0).to(G.dtype)  # (..., nb, p)
        Gs = G.unsqueeze(-3) * on.unsqueeze(-1) * on.unsqueeze(-2) + eye * (1 - on).unsqueeze(-1)
        out[..., rows, :] = torch.linalg.solve(Gs, (h[..., rows, :] * on).unsqueeze(-1)).squeeze(-1).clamp_min(0)
    # KKT checked at the working precision (a float32 solve is not exact to 1e-7)
    bad = ~_kkt_rows(out, G, h, max(tol, 100 * torch.finfo(h.dtype).eps))  # (..., n)
    if bool(bad.any()):  # rows whose active set the sweeps did not settle: solved in full, per basis
        lead = h.shape[:-2]
        h2, G2 = h.reshape(-1, n, p), G.expand(*lead, p, p).reshape(-1, p, p)
        out2, bad2 = out.reshape(-1, n, p), bad.reshape(-1, n)
        for l in bad2.any(1).nonzero().flatten().tolist():
            rows = bad2[l].nonzero().flatten()
            hb = h2[l, rows]
            out2[l, rows] = _enumerate(hb, G2[l], block_rows) if p <= MAX_ENUMERATE_P else _pgd(hb, G2[l], max_iter, tol)
        out = out2.reshape(out.shape)
    return out


def _pgd(h: Tensor, G: Tensor, max_iter: int, tol: float) -> Tensor:
    L = torch.linalg.eigvalsh(G)[..., -1].clamp_min(1e-30)[..., None, None]  # (..., 1, 1)
    E = (h / torch.diagonal(G, dim1=-2, dim2=-1).clamp_min(1e-30).unsqueeze(-2)).clamp_min(0)
    Y, t = E, 1.0
    for _ in range(max_iter):
        E_next = (Y - (Y @ G - h) / L).clamp_min(0)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        Y = E_next + ((t - 1) / t_next) * (E_next - E)
        E, t = E_next, t_next
        if _kkt_met(E, G, h, tol):
            break
    return E


def nnls(
    X: Tensor,
    B: Tensor,
    *,
    method: Method = "auto",
    max_iter: int = 2000,
    tol: float = 1e-7,
    block_rows: int = 4096,
    init: Tensor | None = None,
) -> Tensor:
    """E = argmin_{E ≥ 0} ||X − E B||² row by row (ProtoNMF eq. 9).

    Parameters
    ----------
    X : Tensor of shape (..., n, D)
    B : Tensor of shape (..., p, D), broadcast against X's leading axes.
    method : "enumerate" (exact, p ≤ 10), "pgd" (FISTA to a KKT tolerance), "cd" (coordinate
        descent to the same tolerance, from ``init``), or "auto" (the first when p ≤ 10).
    max_iter, tol : iteration (sweep) cap and relative KKT tolerance of "pgd" and "cd".
    init : (..., n, p) starting codes for "cd" (default: each coordinate's own least squares, ≥ 0).

    Returns
    -------
    E : Tensor of shape (..., n, p), float64 if X or B is float64, else float32.
    """
    _check(X, B)
    dtype = torch.float64 if torch.float64 in (X.dtype, B.dtype) else torch.float32
    X, B = X.to(dtype), B.to(dtype)
    G = B @ B.transpose(-1, -2)  # (..., p, p)
    h = X @ B.transpose(-1, -2)  # (..., n, p)
    G = G.expand(*h.shape[:-2], *G.shape[-2:]) if G.ndim < h.ndim else G
    p = B.shape[-2]
    if method == "auto":
        method = "enumerate" if p <= MAX_ENUMERATE_P else "pgd"
    if method == "enumerate":
        if p > MAX_ENUMERATE_P:
            raise ValueError(f"method='enumerate' solves 2^p active sets; p = {p} > {MAX_ENUMERATE_P}, use 'pgd'")
        rows = max(1, block_rows // 2 ** max(p - 6, 0))
        return _enumerate(h, G, rows)
    if method == "pgd":
        return _pgd(h, G, max_iter, tol)
    if method == "cd":
        if init is not None and init.shape != h.shape:
            raise ValueError(f"init must have shape {tuple(h.shape)}, got {tuple(init.shape)}")
        return _cd(h, G, init, max_iter, tol, max(1, block_rows // 4))
    raise ValueError(f"method must be 'auto', 'enumerate', 'pgd' or 'cd', got {method!r}")


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Undo broadcasting: sum ``grad`` over the leading axes it gained and the axes of size 1."""
    grad = grad.sum(tuple(range(grad.ndim - len(shape)))) if grad.ndim > len(shape) else grad
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and grad.shape[i] != 1)
    return grad.sum(dims, keepdim=True) if dims else grad


class _NNLS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X: Tensor, B: Tensor, method: Method, max_iter: int, tol: float, block_rows: int) -> Tensor:
        E = nnls(X, B, method=method, max_iter=max_iter, tol=tol, block_rows=block_rows)
        ctx.save_for_backward(X, B, E)
        return E

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_E: Tensor):
        X, B, E = ctx.saved_tensors
        Xc, Bc, gE = X.to(E.dtype), B.to(E.dtype), grad_E.to(E.dtype)
        active = (E > 0).to(E.dtype)  # (..., n, p); a coordinate exactly at 0 counts as inactive
        G = Bc @ Bc.transpose(-1, -2)  # (..., p, p)
        Gs = G.unsqueeze(-3) * active.unsqueeze(-1) * active.unsqueeze(-2)  # (..., n, p, p): G_SS, 0 off S
        # pinv of the masked G is (G_SS)⁻¹ on S and 0 off it, so v vanishes off the active set.
        v = (torch.linalg.pinv(Gs, hermitian=True) @ (active * gE).unsqueeze(-1)).squeeze(-1)  # (..., n, p)
        grad_X = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_X = _sum_to(v @ Bc, X.shape).to(X.dtype)  # h = Bx  ⇒  ∂L/∂x = Bᵀv
        if ctx.needs_input_grad[1]:
            # dE_S = −G_SS⁻¹ dG_SS e_S  ⇒  ∂L/∂G = −Σ_rows v eᵀ
            vE = v.transpose(-1, -2) @ E  # (..., p, p)
            grad_B = v.transpose(-1, -2) @ Xc - (vE + vE.transpose(-1, -2)) @ Bc  # (..., p, D)
            grad_B = _sum_to(grad_B, B.shape).to(B.dtype)
        return grad_X, grad_B, None, None, None, None


def nnls_differentiable(
    X: Tensor,
    B: Tensor,
    *,
    method: Method = "auto",
    max_iter: int = 2000,
    tol: float = 1e-7,
    block_rows: int = 4096,
) -> Tensor:
    """:func:`nnls` with gradients w.r.t. X and B by implicit differentiation (CRAFT §3.4).

    The forward pass is ``nnls(X, B, ...)`` itself. The backward pass differentiates the KKT
    conditions of each row at its solution: with S = {j : E_j > 0}, G = BBᵀ and h = Bx,

        G_SS e_S = h_S,  e_j = 0 (j ∉ S)   ⇒   de_S = (G_SS)⁻¹ (dh_S − dG_SS e_S)

    which is exact wherever the active set is locally constant (strict complementarity: every
    inactive coordinate has a strictly positive multiplier (Ge − h)_j). At a kink (E_j = 0 with a
    zero multiplier) it returns the one-sided derivative that keeps j inactive. All rows are
    handled at once through masked (..., n, p, p) matrices. Not twice differentiable.

    Parameters
    ----------
    X : Tensor of shape (..., n, D)
    B : Tensor of shape (..., p, D), broadcast against X's leading axes.
    method, max_iter, tol, block_rows : as in :func:`nnls`. With "pgd" the active set, hence the
        gradient, is only as accurate as the solve.

    Returns
    -------
    E : Tensor of shape (..., n, p), float64 if X or B is float64, else float32; gradients come back
        in X's and B's own dtypes and shapes.
    """
    return _NNLS.apply(X, B, method, max_iter, tol, block_rows)
