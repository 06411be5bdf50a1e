"""Classification-head reconstruction from prototypes (ProtoNMF §3.2–3.3).

Notation, batched over K classes (one row of the head per class):

- ``V`` of shape (K, D): the black box's classification head, one weight row V_c per class.
- ``B`` of shape (K, p, D): each class's p NMF prototypes (see :mod:`protonmf.nmf`).
- ``C`` of shape (K, p): coefficients a_1..a_p of the prototypes in each class's head (C_opt).
- ``R`` of shape (K, D): the residual prototype V_c − C_c B_c.
- ``A``, ``E`` of shapes (K, n, D), (K, n, p): features and encodings, as in :mod:`protonmf.nmf`.
- ``pieces`` of shape (K, p, D): the residual split over the prototypes, Σ_i r_i = R_c (Tan et
  al., "Post-hoc Part-prototype Networks", ICML 2024; they write p_i for our b_i and α_i for a_i).

Two solvers of eq. 4 give the same C: cvxpy (the solver of record, also for ``nonneg=True``) and a
batched closed form (the pseudo-inverse of B) that solves all classes at once. Everything here runs
in float64: the head is small, and eq. 8 divides by Σa_i, which can be small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "HeadFit",
    "absorb_residual_pieces",
    "augment_prototypes",
    "distribute_residual",
    "reconstruct_head",
    "residual_heatmap",
    "solve_coefficients_closed_form",
    "solve_coefficients_cvxpy",
]

Residual = Literal["equal", "distributed"]
RESIDUALS: tuple[str, ...] = ("equal", "distributed")

Solver = Literal["closed_form", "cvxpy"]

# Σa_i below this fraction of Σ|a_i| counts as zero: eq. 8 is then undefined and the residual
# stays an explicit term of the class's logit (eq. 7) instead of being spread over the prototypes.
SPREAD_RTOL = 1e-9


@dataclass(frozen=True)
class HeadFit:
    """Result of :func:`reconstruct_head`.

    Attributes
    ----------
    C : Tensor of shape (K, p), float64, the coefficients (eq. 4).
    R : Tensor of shape (K, D), float64, the residual prototypes (eq. 5).
    relative_error : Tensor of shape (K,), float64, ||V − CB||² / ||V||².
    """

    C: Tensor
    R: Tensor
    relative_error: Tensor


def _check_head(V: Tensor, B: Tensor) -> None:
    if V.ndim != 2:
        raise ValueError(f"V (head weights) must have shape (K, D), got {tuple(V.shape)}")
    if B.ndim != 3:
        raise ValueError(f"B (prototypes) must have shape (K, p, D), got {tuple(B.shape)}")
    if V.shape[0] != B.shape[0]:
        raise ValueError(f"V has {V.shape[0]} classes but B has {B.shape[0]}")
    if V.shape[1] != B.shape[2]:
        raise ValueError(
            f"feature dimension mismatch: head V has D = {V.shape[1]} but prototypes B have D = {B.shape[2]}"
        )
    for name, t in (("V", V), ("B", B)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or Inf values")


def solve_coefficients_closed_form(V: Tensor, B: Tensor) -> Tensor:
    """C_c = argmin_C ||V_c − C B_c||² for all classes at once (eq. 4): C_c = V_c B_c⁺.

    Parameters
    ----------
    V : Tensor of shape (K, D)
    B : Tensor of shape (K, p, D)

    Returns
    -------
    C : Tensor of shape (K, p), float64. The minimum-norm solution if B_c is rank-deficient.
    """
    _check_head(V, B)
    pinv = torch.linalg.pinv(B.double())  # (K, D, p)
    return (V.double().unsqueeze(1) @ pinv).squeeze(1)  # eq. 4


def solve_coefficients_cvxpy(V: Tensor, B: Tensor, *, nonneg: bool = False) -> Tensor:
    """C_c = argmin_C ||V_c − C B_c||² with cvxpy, one small problem per class (eq. 4).

    The problem is compiled once with B_c and V_c as parameters and re-solved per class.
    ``nonneg=True`` adds C ≥ 0 (beyond the paper: every prototype then votes for its class).

    Returns
    -------
    C : Tensor of shape (K, p), float64.
    """
    import cvxpy as cp

    _check_head(V, B)
    K, p, D = B.shape
    Bn = B.detach().double().cpu().numpy()
    Vn = V.detach().double().cpu().numpy()
    # Scale each class to unit ||V_c|| so that solver tolerances are relative.
    scale = np.linalg.norm(Vn, axis=1)
    scale[scale == 0] = 1.0
    c = cp.Variable(p, nonneg=nonneg)
    b = cp.Parameter((p, D))
    v = cp.Parameter(D)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(c @ b - v)))  # eq. 4
    out = np.empty((K, p))
    for k in range(K):
        b.value = Bn[k] / scale[k]
        v.value = Vn[k] / scale[k]
        problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, tol_ktratio=1e-9)
        if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or c.value is None:
            raise RuntimeError(f"cvxpy could not solve the head reconstruction of class {k}: {problem.status}")
        out[k] = c.value
    return torch.from_numpy(out).to(B.device)


def reconstruct_head(
    V: Tensor, B: Tensor, *, nonneg: bool = False, solver: Solver = "closed_form"
) -> HeadFit:
    """Coefficients (eq. 4) and residual prototype R_c = V_c − C_c B_c (eq. 5) for every class.

    Parameters
    ----------
    V : Tensor of shape (K, D), the head weights.
    B : Tensor of shape (K, p, D), the prototypes of each class.
    nonneg : bool, constrain C ≥ 0 (solved by cvxpy whatever ``solver`` says).
    solver : "closed_form" (batched pseudo-inverse) or "cvxpy".
    """
    if solver not in ("closed_form", "cvxpy"):
        raise ValueError(f"solver must be 'closed_form' or 'cvxpy', got {solver!r}")
    if solver == "cvxpy" or nonneg:
        C = solve_coefficients_cvxpy(V, B, nonneg=nonneg)
    else:
        C = solve_coefficients_closed_form(V, B)
    V64 = V.double()
    R = V64 - (C.unsqueeze(1) @ B.double()).squeeze(1)  # eq. 5
    norm_V = V64.square().sum(1).clamp_min(torch.finfo(torch.float64).tiny)
    return HeadFit(C=C, R=R, relative_error=R.square().sum(1) / norm_V)


def residual_heatmap(A: Tensor, E: Tensor, B: Tensor, R: Tensor) -> Tensor:
    """H_c = argmin_H ||A_c − E_c B_c − H R_c||² (eq. 6), in closed form (A − EB) R_cᵀ / ||R_c||².

    Parameters
    ----------
    A : Tensor of shape (K, n, D), features (negatives are taken as 0, as for the NMF).
    E : Tensor of shape (K, n, p), B : Tensor of shape (K, p, D), R : Tensor of shape (K, D).

    Returns
    -------
    H : Tensor of shape (K, n), in A's dtype, at least float32 (float64 for float64 A): where the
        residual prototype explains what the NMF prototypes leave out. Zero for a class whose
        residual is zero.
    """
    dtype = torch.promote_types(A.dtype, torch.float32)
    Rd = R.to(dtype)
    Ar = A.to(dtype).clamp_min(0) @ Rd.unsqueeze(2)  # (K, n, 1)
    Er = E.to(dtype) @ (B.to(dtype) @ Rd.unsqueeze(2))  # (K, n, 1)
    norm_R = Rd.square().sum(1, keepdim=True)
    # The divisor is ||R||² itself wherever it is not 0 (a floor such as 1e-30 would bend tiny residuals).
    return torch.where(norm_R > 0, (Ar - Er).squeeze(2) / torch.where(norm_R > 0, norm_R, 1.0), 0.0)  # eq. 6


def augment_prototypes(B: Tensor, C: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """b'_i = b_i + R_c / Σ_j a_j (eq. 8), so that Σ_i a_i b'_i = V_c exactly.

    Returns
    -------
    B_aug : Tensor of shape (K, p, D), float64, the augmented prototypes.
    spread : Tensor of shape (K,), bool. False where Σ_j a_j is zero (relative to Σ_j |a_j|):
        eq. 8 is undefined there, B_aug = B, and the residual remains an explicit term (eq. 7).
    """
    total = C.double().sum(1)
    spread = total.abs() > SPREAD_RTOL * C.double().abs().sum(1)
    shift = torch.where(spread.unsqueeze(1), R.double() / torch.where(spread, total, 1.0).unsqueeze(1), 0.0)
    return B.double() + shift.unsqueeze(1), spread  # eq. 8


def distribute_residual(A: Tensor, B: Tensor, R: Tensor, *, block_rows: int = 4096) -> Tensor:
    """Split each class's residual into one piece per prototype whose heatmap looks like the prototype's.

    Tan et al. (ICML 2024) minimise Σ_i ||Norm(F b_iᵀ) − Norm(F r_iᵀ)||² subject to Σ_i r_i = R,
    F = the class's stacked features (here A, negatives set to 0 as the NMF sees them). We take
    Norm_i(x) = x / s_i with the constant s_i = ||F b_iᵀ|| (over all positions of the class), and
    give each piece's map a free scale λ_i, so the problem stays a least squares under a linear
    equality constraint:

        min_{r, λ} Σ_i ||λ_i F b_iᵀ − F r_iᵀ||² / s_i²   subject to   Σ_i r_i = R.

    Its KKT system (G = FᵀF, the class's Gram matrix) has the closed form

        λ = argmin_λ ||F Rᵀ − Σ_i λ_i F b_iᵀ||²,   i.e. (B G Bᵀ) λ = B G Rᵀ (minimum-norm if singular),
        r_i = λ_i b_i + (s_i² / Σ_j s_j²) (R − Σ_j λ_j b_j):

    λ regresses the residual's heatmap on the prototypes' heatmaps (each prototype takes the part of
    the residual's map shaped like its own), and what no prototype's map explains is split in
    proportion to s_i². For any λ the pieces sum to R, so the constraint holds to rounding. When G is
    singular (fewer positions than channels, dead channels) this r is one of the minimisers.
    If every s_i is 0 (no prototype lights up anywhere) the rest is split equally.

    Parameters
    ----------
    A : Tensor of shape (K, n, D), features (zero-padded rows contribute nothing).
    B : Tensor of shape (K, p, D), the NMF prototypes. R : Tensor of shape (K, D), the residuals (eq. 5).
    block_rows : rows of A read at a time (only the (K, p + 1, p + 1) moments of the maps are kept).

    Returns
    -------
    pieces : Tensor of shape (K, p, D), float64, on B's device; Σ_i pieces[:, i] = R.
    """
    if A.ndim != 3 or B.ndim != 3 or R.ndim != 2:
        raise ValueError(f"A, B, R must have shapes (K, n, D), (K, p, D), (K, D), got {tuple(A.shape)}, {tuple(B.shape)}, {tuple(R.shape)}")
    if not (A.shape[0] == B.shape[0] == R.shape[0]) or not (A.shape[2] == B.shape[2] == R.shape[1]):
        raise ValueError(f"A {tuple(A.shape)}, B {tuple(B.shape)} and R {tuple(R.shape)} disagree on K or D")
    K, p, _ = B.shape
    dtype = torch.promote_types(A.dtype, torch.float32)  # float32 maps suffice: λ does not affect Σ r_i = R
    W = torch.cat([B, R.unsqueeze(1)], 1).to(dtype).transpose(1, 2)  # (K, D, p + 1)
    moments = torch.zeros(K, p + 1, p + 1, dtype=torch.float64, device=B.device)
    for start in range(0, A.shape[1], block_rows):
        maps = A[:, start : start + block_rows].to(device=B.device, dtype=dtype).clamp_min(0) @ W  # (K, rows, p + 1)
        moments += (maps.transpose(1, 2) @ maps).double()
    gram_b, gram_br = moments[:, :p, :p], moments[:, :p, p]  # B G Bᵀ, B G Rᵀ
    lam = (torch.linalg.pinv(gram_b, hermitian=True) @ gram_br.unsqueeze(2)).squeeze(2)  # (K, p)
    s2 = torch.diagonal(gram_b, dim1=1, dim2=2).clamp_min(0)  # s_i²
    total = s2.sum(1, keepdim=True)
    share = torch.where(total > 0, s2 / torch.where(total > 0, total, 1.0), 1.0 / p)
    B64, R64 = B.double(), R.double()
    rest = R64 - (lam.unsqueeze(1) @ B64).squeeze(1)  # R − Σ_j λ_j b_j
    return lam.unsqueeze(2) * B64 + share.unsqueeze(2) * rest.unsqueeze(1)  # r_i (Tan et al.)


def absorb_residual_pieces(B: Tensor, C: Tensor, pieces: Tensor) -> tuple[Tensor, Tensor]:
    """b'_i = b_i + r_i / a_i, so that a_i b'_i = a_i b_i + r_i = p̃_i (Tan et al.) and Σ_i a_i b'_i = V_c.

    The model then reads b'_i exactly as it reads eq. 8's (logits, contributions, interventions).

    Parameters
    ----------
    B : (K, p, D), C : (K, p), pieces : (K, p, D) from :func:`distribute_residual`.

    Returns
    -------
    B_aug : Tensor of shape (K, p, D), float64.
    spread : Tensor of shape (K,), bool. False where some a_i is zero (relative to Σ_j |a_j|): its
        piece cannot be carried by b'_i; there B_aug = B and the residual stays explicit (eq. 7).
    """
    C64 = C.double()
    spread = (C64.abs() > SPREAD_RTOL * C64.abs().sum(1, keepdim=True)).all(1)
    safe = torch.where(spread.unsqueeze(1), C64, 1.0)
    shift = torch.where(spread.view(-1, 1, 1), pieces.double() / safe.unsqueeze(2), 0.0)
    return B.double() + shift, spread
