"""Non-negative matrix factorization by Lee–Seung multiplicative updates, batched over classes.

Notation (ProtoNMF §3.1), kept throughout the package:

- ``A`` of shape (n, D): the non-negative features of one class, one row per feature-map position
  (n = images × H × W), D channels. Negative entries are treated as 0 (ProtoNMF §3.1).
- ``E`` of shape (n, p): the encoding, i.e. where and how strongly each prototype is present.
- ``B`` of shape (p, D): the basis, i.e. the p prototypes.

scikit-learn names the same factors ``W`` (our E) and ``H`` (our B); CRAFT names them ``U`` (our E)
and ``W^T`` (our B). We use E and B everywhere.

Batching: ``A`` of shape (C, n, D) holds C classes, each padded with zero rows up to n, with
``n_rows`` (C,) giving the real row counts. Padding is exact: a padded row of E starts at 0 and a
multiplicative update keeps 0 at 0, so it adds nothing to EᵀA or EᵀE. Every class is initialised
from the same ``seed`` and stops on its own criterion, so a class gets the same result alone or in
any batch.

Each iteration reads A once, in row blocks: E_i is updated from A_i and B, and E_iᵀA_i, E_iᵀE_i
are accumulated in the same pass; B is updated after the pass, and the error follows from
||A||² − 2⟨EᵀA, B⟩ + ⟨EᵀE, BBᵀ⟩ without touching A again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["NMFResult", "nmf"]

_EPS = 1e-7  # floor of the update denominators, as in the DFF code the paper builds on
_CPU_CAST_BYTES = 4 * 2**30  # float16 A up to this size (as float32) is cast once on a CPU


@dataclass(frozen=True)
class NMFResult:
    """Factors and convergence record of :func:`nmf`.

    Shapes are given for batched input; for a single (n, D) matrix the leading C axis is dropped.

    Attributes
    ----------
    E : Tensor of shape (C, n, p), the encoding (rows past a class's ``n_rows`` are 0).
    B : Tensor of shape (C, p, D), the prototypes.
    error : Tensor of shape (C,), float64, the final ||A − EB||² (eq. 3).
    init_error : Tensor of shape (C,), float64, ||A − E₀B₀||² at the random initialisation.
    norm_A : Tensor of shape (C,), float64, ||A||².
    n_iter : Tensor of shape (C,), int64, the number of updates each class ran.
    history : Tensor of shape (C, max_iter + 1), float64, the error before the first update and
        after each update; NaN once a class has stopped.
    """

    E: Tensor
    B: Tensor
    error: Tensor
    init_error: Tensor
    norm_A: Tensor
    n_iter: Tensor
    history: Tensor

    @property
    def relative_error(self) -> Tensor:
        """||A − EB||² / ||A||², of shape (C,)."""
        return self.error / self.norm_A.clamp_min(torch.finfo(torch.float64).tiny)


def _validate(A: Tensor, p: int, n_rows: Tensor | None, max_iter: int, tol: float) -> Tensor:
    if not isinstance(A, Tensor):
        raise TypeError(f"A must be a torch.Tensor of shape (n, D) or (C, n, D), got {type(A).__name__}")
    if A.ndim not in (2, 3):
        raise ValueError(f"A must have shape (n, D) or (C, n, D), got shape {tuple(A.shape)}")
    if not A.is_floating_point():
        raise ValueError(f"A must be a floating-point tensor, got dtype {A.dtype}")
    C, n, D = (1, *A.shape) if A.ndim == 2 else A.shape
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)):
        raise ValueError(f"p (number of prototypes) must be an integer, got {p!r}")
    if p < 1:
        raise ValueError(f"p (number of prototypes) must be >= 1, got {p}")
    if p > D:
        raise ValueError(f"p (number of prototypes) = {p} exceeds the feature dimension D = {D}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if n == 0 or C == 0:
        raise ValueError(f"A has no rows (shape {tuple(A.shape)}): a class needs at least one feature vector")
    if n_rows is None:
        n_rows = torch.full((C,), n, dtype=torch.int64)
    else:
        n_rows = torch.as_tensor(n_rows, dtype=torch.int64).reshape(-1).cpu()
        if n_rows.numel() != C:
            raise ValueError(f"n_rows has {n_rows.numel()} entries but A holds {C} classes")
        if (n_rows > n).any():
            raise ValueError(f"n_rows must be <= the padded row count {n}, got max {int(n_rows.max())}")
    empty = (n_rows <= 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"A: class(es) at batch index {empty} have no feature rows (empty class)")
    return n_rows


def _blocks(n: int, block_rows: int):
    for start in range(0, n, block_rows):
        yield slice(start, min(start + block_rows, n))


def _init_factors(
    n_rows: Tensor, n: int, D: int, p: int, mean_A: Tensor, seed: int, dtype: torch.dtype, device
) -> tuple[Tensor, Tensor]:
    """|N(0, 1)| entries scaled by sqrt(mean(A)/p), drawn per class from ``seed`` on the CPU.

    The paper zeroes the negative draws; under multiplicative updates a zero entry stays zero for
    good, which would freeze half of E and B. The DFF code the paper cites takes absolute values
    instead, and so do we. Drawing on the CPU makes the start identical on every device.
    """
    C = n_rows.numel()
    E = torch.zeros(C, n, p, dtype=dtype, device=device)
    B = torch.empty(C, p, D, dtype=dtype, device=device)
    for c in range(C):  # per class, so that a class starts the same alone or in any batch
        g = torch.Generator().manual_seed(int(seed))
        scale = math.sqrt(float(mean_A[c]) / p)
        rows = int(n_rows[c])
        E[c, :rows] = (torch.randn(rows, p, generator=g, dtype=torch.float64).abs() * scale).to(device, dtype)
        B[c] = (torch.randn(p, D, generator=g, dtype=torch.float64).abs() * scale).to(device, dtype)
    return E, B


def _error(norm_A: Tensor, EtA: Tensor, EtE: Tensor, B: Tensor) -> Tensor:
    """||A − EB||² = ||A||² − 2⟨EᵀA, B⟩ + ⟨EᵀE, BBᵀ⟩, in float64 (eq. 3)."""
    B64 = B.double()
    cross = (EtA.double() * B64).sum((-2, -1))
    gram = (EtE.double() * (B64 @ B64.transpose(-1, -2))).sum((-2, -1))
    return (norm_A - 2 * cross + gram).clamp_min(0)


@torch.no_grad()
def nmf(
    A: Tensor,
    p: int,
    *,
    max_iter: int = 200,
    tol: float = 1e-4,
    seed: int = 0,
    n_rows: Tensor | None = None,
    block_rows: int = 8192,
    device: torch.device | str | None = None,
    init: tuple[Tensor, Tensor] | None = None,
) -> NMFResult:
    """Factorize A ≈ E B with E, B ≥ 0 by multiplicative updates (ProtoNMF eq. 1–3).

    Minimizes ||A − EB||²_F with the Lee–Seung updates (eq. 2)

        E ← E ⊙ (ABᵀ) / (EBBᵀ),    B ← B ⊙ (EᵀA) / (EᵀEB),

    and stops a class once (err_{t−1} − err_t) / err_0 < ``tol``, err_0 being the error at the
    random initialisation (eq. 3), or after ``max_iter`` updates.

    Parameters
    ----------
    A : Tensor of shape (n, D) or (C, n, D)
        Features; negative entries are taken as 0. May be float16/bfloat16: factors and
        accumulators are float32 then (float64 if A is float64).
    p : int
        Number of prototypes, 1 <= p <= D.
    max_iter, tol : stopping rule above; ``tol=0`` runs exactly ``max_iter`` updates.
    seed : int
        Seed of the initialisation; every class starts from this seed.
    n_rows : Tensor of shape (C,), optional
        Real row count of each class when A is padded with zero rows.
    block_rows : int
        Rows of A read per step; bounds the working memory to C × block_rows × D.
    device : where to compute; defaults to A's device. A may stay on the CPU and be streamed.
    init : (E₀, B₀), optional
        Starting factors of shapes (C, n, p), (C, p, D) (or unbatched) instead of the random start,
        e.g. the factors of a previous call (``max_iter=0`` returns the random start itself).

    Returns
    -------
    NMFResult
    """
    n_rows = _validate(A, p, n_rows, max_iter, tol)
    single = A.ndim == 2
    if single:
        A = A.unsqueeze(0)
    C, n, D = A.shape
    device = torch.device(device) if device is not None else A.device
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32

    if A.dtype != dtype and device.type == "cpu" and A.numel() * 4 <= _CPU_CAST_BYTES:
        A = A.to(dtype)  # half-precision matmuls are slow on CPUs: cast once, not every pass

    # Pass 0: ||A||², mean(A) for the init scale, and checks for NaN/Inf and negative entries.
    norm_A = torch.zeros(C, dtype=torch.float64, device=device)
    sum_A = torch.zeros(C, dtype=torch.float64, device=device)
    negative = False
    for rows in _blocks(n, block_rows):
        Ab = A[:, rows].to(device=device, dtype=dtype, non_blocking=True)
        if not torch.isfinite(Ab).all():
            bad = (~torch.isfinite(Ab)).flatten(1).any(1).nonzero().flatten().tolist()
            raise ValueError(f"A contains NaN or Inf values (class batch index {bad})")
        negative = negative or bool((Ab < 0).any())
        Ab = Ab.clamp_min(0)
        norm_A += Ab.double().square().sum((1, 2))
        sum_A += Ab.double().sum((1, 2))
    mean_A = (sum_A / (n_rows.to(device) * D)).cpu()
    if negative:
        A = A.clamp_min(0)  # ProtoNMF §3.1: negative features are set to 0 (one copy, once)

    if init is None:
        E, B = _init_factors(n_rows, n, D, p, mean_A, seed, dtype, device)
    else:
        E, B = (t.unsqueeze(0) if single else t for t in init)
        if E.shape != (C, n, p) or B.shape != (C, p, D):
            raise ValueError(f"init: expected E of shape {(C, n, p)} and B of shape {(C, p, D)}, "
                             f"got {tuple(E.shape)} and {tuple(B.shape)}")
        if (E < 0).any() or (B < 0).any():
            raise ValueError("init: E and B must be non-negative")
        E = E.to(device=device, dtype=dtype).clone()
        B = B.to(device=device, dtype=dtype).clone()
        for c in range(C):
            E[c, int(n_rows[c]):] = 0  # padding stays exact

    def accumulate(A_w: Tensor, E_w: Tensor, B_w: Tensor, live: Tensor | None) -> tuple[Tensor, Tensor]:
        """One read of A_w (k, n, D): update E_w blockwise in place where ``live`` (k,) is True
        (all classes if None), and return EᵀA (k, p, D), EᵀE (k, p, p) of the updated E."""
        k = B_w.shape[0]
        BBt = B_w @ B_w.transpose(1, 2)
        EtA = torch.zeros(k, p, D, dtype=dtype, device=device)
        EtE = torch.zeros(k, p, p, dtype=dtype, device=device)
        for rows in _blocks(n, block_rows):
            Ab = A_w[:, rows].to(device=device, dtype=dtype, non_blocking=True)
            Eb = E_w[:, rows]
            if live is not False:
                new = Eb * (Ab @ B_w.transpose(1, 2)) / (Eb @ BBt).clamp_min_(_EPS)  # eq. 2, E step
                Eb = new if live is None else torch.where(live[:, None, None], new, Eb)
                E_w[:, rows] = Eb
            EtA.baddbmm_(Eb.transpose(1, 2), Ab)
            EtE.baddbmm_(Eb.transpose(1, 2), Eb)
        return EtA, EtE

    EtA, EtE = accumulate(A, E, B, live=False)
    init_error = _error(norm_A, EtA, EtE, B)
    history = torch.full((C, max_iter + 1), float("nan"), dtype=torch.float64, device=device)
    history[:, 0] = init_error
    error = init_error.clone()
    n_iter = torch.zeros(C, dtype=torch.int64, device=device)
    active = torch.ones(C, dtype=torch.bool, device=device)
    # The working set: the classes still read each iteration. Converged classes in it are frozen
    # (their updates masked out); once half of it has converged it is compacted, a copy of A made
    # log2(C) times at most instead of at every iteration.
    work = torch.arange(C, device=device)
    A_w = A

    for it in range(1, max_iter + 1):
        live = active[work]
        if int(live.sum()) <= len(work) // 2:
            work = active.nonzero().flatten()
            A_w = A[work.to(A.device)]
            live = active[work]
        whole = len(work) == C
        E_w = E if whole else E[work]
        B_w = B if whole else B[work]
        EtA, EtE = accumulate(A_w, E_w, B_w, None if bool(live.all()) else live)
        B_new = B_w * EtA / (EtE @ B_w).clamp_min_(_EPS)  # eq. 2, B step
        err = _error(norm_A[work], EtA, EtE, B_new)
        B_new = torch.where(live[:, None, None], B_new, B_w)
        if not whole:
            E[work] = E_w
        B[work] = B_new
        upd = work[live]
        err = err[live]
        prev = error[upd].clone()
        history[upd, it] = err
        error[upd] = err
        n_iter[upd] = it
        if tol > 0:
            converged = (prev - err) / init_error[upd].clamp_min(torch.finfo(torch.float64).tiny) < tol
            active[upd[converged]] = False
            if not active.any():
                break

    result = NMFResult(E=E, B=B, error=error, init_error=init_error, norm_A=norm_A, n_iter=n_iter, history=history)
    if single:
        result = NMFResult(**{f: getattr(result, f)[0] for f in result.__dataclass_fields__})
    return result
