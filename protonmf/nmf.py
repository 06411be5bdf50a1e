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

Several p at once (:func:`nmf_sweep`): the factors of every p are concatenated along the factor
axis, E of shape (C, n, P) and B of shape (C, P, D) with P = Σp, so that one read of a row block
A_i gives A_iBᵀ and E_iᵀA_i for all p together. Masking BBᵀ and EᵀE to their block diagonal (one
p × p block per p) keeps the problems independent: each (class, p) block starts from the init of
its own :func:`nmf` call, stops on its own criterion and is frozen from then on. :func:`nmf` is
the sweep of a single p.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["NMFResult", "nmf", "nmf_sweep"]

_EPS = 1e-7  # floor of the update denominators, as in the DFF code the paper builds on
_CPU_CAST_BYTES = 4 * 2**30  # float16 A up to this size (as float32) is cast once on a CPU
_TINY = torch.finfo(torch.float64).tiny


@dataclass(frozen=True)
class NMFResult:
    """Factors and convergence record of :func:`nmf` (and of each p of :func:`nmf_sweep`).

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
        return self.error / self.norm_A.clamp_min(_TINY)


@dataclass(frozen=True)
class _Layout:
    """Where the factors of each p lie in the concatenated E (C, n, P) and B (C, P, D).

    Attributes
    ----------
    ps : the prototype counts, one block of columns of E (rows of B) each, in this order.
    col_block : Tensor of shape (P,), int64, the index in ``ps`` of each factor column.
    mask : Tensor of shape (P, P), 1 on the block diagonal and 0 off it; None for a single p.
    """

    ps: tuple[int, ...]
    col_block: Tensor
    mask: Tensor | None

    @classmethod
    def of(cls, ps: Sequence[int], dtype: torch.dtype, device: torch.device) -> _Layout:
        sizes = torch.tensor(ps, device=device)
        col_block = torch.repeat_interleave(torch.arange(len(ps), device=device), sizes)
        same = col_block[:, None] == col_block[None, :]
        return cls(tuple(ps), col_block, same.to(dtype) if len(ps) > 1 else None)

    def columns(self, g: int) -> slice:
        """The factor columns of ``ps[g]``."""
        start = sum(self.ps[:g])
        return slice(start, start + self.ps[g])

    def block_sums(self, x: Tensor) -> Tensor:
        """Sums over each block's columns: (k, P) → (k, G)."""
        out = x.new_zeros(x.shape[0], len(self.ps))
        return out.index_add_(1, self.col_block, x)

    def expand(self, per_block: Tensor) -> Tensor:
        """A value per block to a value per column: (k, G) → (k, P)."""
        return per_block[:, self.col_block]


@dataclass
class _Trace:
    """Convergence record of every (class, p) block, updated in place; shapes (C, G[, max_iter + 1])."""

    init_error: Tensor
    error: Tensor
    n_iter: Tensor
    history: Tensor
    active: Tensor

    @classmethod
    def start(cls, init_error: Tensor, max_iter: int) -> _Trace:
        C, G = init_error.shape
        history = init_error.new_full((C, G, max_iter + 1), float("nan"))
        history[..., 0] = init_error
        return cls(
            init_error=init_error,
            error=init_error.clone(),
            n_iter=torch.zeros(C, G, dtype=torch.int64, device=init_error.device),
            history=history,
            active=torch.ones(C, G, dtype=torch.bool, device=init_error.device),
        )

    def record(self, work: Tensor, live: Tensor, err: Tensor, it: int, tol: float) -> None:
        """Log update ``it`` of the live blocks (``live``, ``err`` of shape (k, G) over ``work``)
        and freeze those that meet the stopping rule."""
        rows, g = live.nonzero(as_tuple=True)
        classes = work[rows]
        err = err[rows, g]
        prev = self.error[classes, g]
        self.history[classes, g, it] = err
        self.error[classes, g] = err
        self.n_iter[classes, g] = it
        if tol > 0:
            converged = (prev - err) / self.init_error[classes, g].clamp_min(_TINY) < tol  # eq. 3
            self.active[classes[converged], g[converged]] = False


def _check_A(A: Tensor) -> int:
    """Check A's type and shape; return its feature dimension D."""
    if not isinstance(A, Tensor):
        raise TypeError(f"A must be a torch.Tensor of shape (n, D) or (C, n, D), got {type(A).__name__}")
    if A.ndim not in (2, 3):
        raise ValueError(f"A must have shape (n, D) or (C, n, D), got shape {tuple(A.shape)}")
    if not A.is_floating_point():
        raise ValueError(f"A must be a floating-point tensor, got dtype {A.dtype}")
    return A.shape[-1]


def _check_p(p: int, D: int, name: str = "p") -> int:
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)):
        raise ValueError(f"{name} (number of prototypes) must be an integer, got {p!r}")
    if p < 1:
        raise ValueError(f"{name} (number of prototypes) must be >= 1, got {p}")
    if p > D:
        raise ValueError(f"{name} (number of prototypes) = {p} exceeds the feature dimension D = {D}")
    return int(p)


def _check_ps(ps: Sequence[int], D: int) -> tuple[int, ...]:
    if isinstance(ps, (str, bytes)) or not isinstance(ps, Sequence):
        raise ValueError(f"ps (prototype counts) must be a sequence of integers, got {ps!r}")
    if len(ps) == 0:
        raise ValueError("ps (prototype counts) is empty: give at least one p")
    ps = tuple(_check_p(p, D, f"ps[{i}]") for i, p in enumerate(ps))
    duplicates = sorted({p for p in ps if ps.count(p) > 1})
    if duplicates:
        raise ValueError(f"ps (prototype counts) has duplicates {duplicates}: give each p once")
    return ps


def _check_rows(A: Tensor, n_rows: Tensor | None, max_iter: int, tol: float) -> Tensor:
    """Check the stopping rule and the real row counts; return n_rows (C,) int64 on the CPU."""
    C, n, _ = (1, *A.shape) if A.ndim == 2 else A.shape
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


def _scan(A: Tensor, n_rows: Tensor, block_rows: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor, bool]:
    """Pass 0 over A (C, n, D): ||A||² (C,), mean(A) (C,) for the init scale, whether A has
    negative entries; NaN and Inf are refused. Negatives count as 0 (ProtoNMF §3.1)."""
    C, n, D = A.shape
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
    return norm_A, mean_A, negative


def _init_factors(
    n_rows: Tensor, n: int, D: int, layout: _Layout, mean_A: Tensor, seed: int, dtype: torch.dtype, device
) -> tuple[Tensor, Tensor]:
    """|N(0, 1)| entries scaled by sqrt(mean(A)/p), drawn per class and per p from ``seed`` on the CPU.

    The paper zeroes the negative draws; under multiplicative updates a zero entry stays zero for
    good, which would freeze half of E and B. The DFF code the paper cites takes absolute values
    instead, and so do we. Drawing on the CPU makes the start identical on every device; drawing
    each (class, p) from a fresh generator makes it the same alone, in any batch, in any sweep.

    Returns
    -------
    E : Tensor of shape (C, n, P), B : Tensor of shape (C, P, D).
    """
    C, P = n_rows.numel(), len(layout.col_block)
    E = torch.zeros(C, n, P, dtype=dtype, device=device)
    B = torch.empty(C, P, D, dtype=dtype, device=device)
    for c in range(C):
        rows = int(n_rows[c])
        for g, p in enumerate(layout.ps):
            gen = torch.Generator().manual_seed(int(seed))
            scale = math.sqrt(float(mean_A[c]) / p)
            cols = layout.columns(g)
            E[c, :rows, cols] = (torch.randn(rows, p, generator=gen, dtype=torch.float64).abs() * scale).to(device, dtype)
            B[c, cols] = (torch.randn(p, D, generator=gen, dtype=torch.float64).abs() * scale).to(device, dtype)
    return E, B


def _given_factors(
    init: tuple[Tensor, Tensor], single: bool, n_rows: Tensor, shape: tuple[int, int, int, int], dtype, device
) -> tuple[Tensor, Tensor]:
    """Copies of user-given starting factors (E₀, B₀), checked against shape (C, n, p, D)."""
    C, n, p, D = shape
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
    return E, B


def _masked(M: Tensor, mask: Tensor | None) -> Tensor:
    """M (k, P, P) with the entries across two p zeroed: the p problems stay independent."""
    return M if mask is None else M * mask


def _accumulate(
    A_w: Tensor, E_w: Tensor, B_w: Tensor, mask: Tensor | None, live: Tensor | None, block_rows: int,
    *, update: bool = True,
) -> tuple[Tensor, Tensor]:
    """One read of A_w (k, n, D).

    If ``update``, E_w (k, n, P) is first updated in place, row block by row block, where ``live``
    (k, P) is True (everywhere if None). Returns EᵀA (k, P, D) and the block diagonal of EᵀE
    (k, P, P) of the updated E.
    """
    k, n, P = E_w.shape
    dtype, device = B_w.dtype, B_w.device
    BBt = _masked(B_w @ B_w.transpose(1, 2), mask)
    EtA = torch.zeros(k, P, A_w.shape[2], dtype=dtype, device=device)
    EtE = torch.zeros(k, P, P, dtype=dtype, device=device)
    for rows in _blocks(n, block_rows):
        Ab = A_w[:, rows].to(device=device, dtype=dtype, non_blocking=True)
        Eb = E_w[:, rows]
        if update:
            new = Eb * (Ab @ B_w.transpose(1, 2)) / (Eb @ BBt).clamp_min_(_EPS)  # eq. 2, E step
            Eb = new if live is None else torch.where(live[:, None, :], new, Eb)
            E_w[:, rows] = Eb
        EtA.baddbmm_(Eb.transpose(1, 2), Ab)
        EtE.baddbmm_(Eb.transpose(1, 2), Eb)
    return EtA, _masked(EtE, mask)


def _block_errors(norm_A: Tensor, EtA: Tensor, EtE: Tensor, B: Tensor, layout: _Layout) -> Tensor:
    """||A − E_p B_p||² = ||A||² − 2⟨E_pᵀA, B_p⟩ + ⟨E_pᵀE_p, B_pB_pᵀ⟩ per p, in float64 (eq. 3).

    ``EtE`` must be block-diagonal already. Returns a Tensor of shape (k, G).
    """
    B64 = B.double()
    cross = layout.block_sums((EtA.double() * B64).sum(-1))
    gram = layout.block_sums((EtE.double() * (B64 @ B64.transpose(-1, -2))).sum(-1))
    return (norm_A[:, None] - 2 * cross + gram).clamp_min(0)


def _iterate(
    A: Tensor, E: Tensor, B: Tensor, layout: _Layout, norm_A: Tensor, max_iter: int, tol: float, block_rows: int
) -> _Trace:
    """Run the updates (eq. 2) on E (C, n, P) and B (C, P, D) in place until every block stops."""
    C = A.shape[0]
    EtA, EtE = _accumulate(A, E, B, layout.mask, None, block_rows, update=False)
    trace = _Trace.start(_block_errors(norm_A, EtA, EtE, B, layout), max_iter)
    # The working set: the classes still read each iteration. Converged blocks in it are frozen
    # (their updates masked out); once half of its classes have converged in every block it is
    # compacted, a copy of A made log2(C) times at most instead of at every iteration.
    work = torch.arange(C, device=E.device)
    A_w = A
    for it in range(1, max_iter + 1):
        if int(trace.active[work].any(1).sum()) <= len(work) // 2:
            work = trace.active.any(1).nonzero().flatten()
            A_w = A[work.to(A.device)]
        live = trace.active[work]
        whole = len(work) == C
        E_w = E if whole else E[work]
        B_w = B if whole else B[work]
        live_cols = None if bool(live.all()) else layout.expand(live)
        EtA, EtE = _accumulate(A_w, E_w, B_w, layout.mask, live_cols, block_rows)
        B_new = B_w * EtA / (EtE @ B_w).clamp_min_(_EPS)  # eq. 2, B step
        err = _block_errors(norm_A[work], EtA, EtE, B_new, layout)
        if live_cols is not None:
            B_new = torch.where(live_cols[:, :, None], B_new, B_w)
        if not whole:
            E[work] = E_w
        B[work] = B_new
        trace.record(work, live, err, it, tol)
        if not trace.active.any():
            break
    return trace


def _results(
    E: Tensor, B: Tensor, trace: _Trace, norm_A: Tensor, layout: _Layout, single: bool
) -> dict[int, NMFResult]:
    """Split the concatenated factors and the trace into one :class:`NMFResult` per p."""
    out = {}
    for g, p in enumerate(layout.ps):
        cols = layout.columns(g)
        res = NMFResult(
            E=E[..., cols].contiguous(), B=B[:, cols].contiguous(), error=trace.error[:, g].contiguous(),
            init_error=trace.init_error[:, g].contiguous(), norm_A=norm_A, n_iter=trace.n_iter[:, g].contiguous(),
            history=trace.history[:, g].contiguous(),
        )
        out[p] = NMFResult(**{f: getattr(res, f)[0] for f in res.__dataclass_fields__}) if single else res
    return out


def _fit(
    A: Tensor, ps: tuple[int, ...], *, max_iter: int, tol: float, seed: int, n_rows: Tensor | None,
    block_rows: int, device, init: tuple[Tensor, Tensor] | None = None,
) -> dict[int, NMFResult]:
    """The common body of :func:`nmf` and :func:`nmf_sweep`, for A and ps already checked."""
    n_rows = _check_rows(A, n_rows, max_iter, tol)
    single = A.ndim == 2
    if single:
        A = A.unsqueeze(0)
    C, n, D = A.shape
    device = torch.device(device) if device is not None else A.device
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    if A.dtype != dtype and device.type == "cpu" and A.numel() * 4 <= _CPU_CAST_BYTES:
        A = A.to(dtype)  # half-precision matmuls are slow on CPUs: cast once, not every pass

    norm_A, mean_A, negative = _scan(A, n_rows, block_rows, dtype, device)
    if negative:
        A = A.clamp_min(0)  # ProtoNMF §3.1: negative features are set to 0 (one copy, once)
    layout = _Layout.of(ps, dtype, device)
    if init is None:
        E, B = _init_factors(n_rows, n, D, layout, mean_A, seed, dtype, device)
    else:
        E, B = _given_factors(init, single, n_rows, (C, n, ps[0], D), dtype, device)
    trace = _iterate(A, E, B, layout, norm_A, max_iter, tol, block_rows)
    return _results(E, B, trace, norm_A, layout, single)


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
    p = _check_p(p, _check_A(A))
    return _fit(
        A, (p,), max_iter=max_iter, tol=tol, seed=seed, n_rows=n_rows, block_rows=block_rows, device=device, init=init
    )[p]


@torch.no_grad()
def nmf_sweep(
    A: Tensor,
    ps: Sequence[int],
    *,
    max_iter: int = 200,
    tol: float = 1e-4,
    seed: int = 0,
    n_rows: Tensor | None = None,
    block_rows: int = 8192,
    device: torch.device | str | None = None,
) -> dict[int, NMFResult]:
    """:func:`nmf` for every p in ``ps``, reading A once per iteration for all of them.

    The factors of all p are concatenated, E of shape (C, n, P) and B of shape (C, P, D) with
    P = Σp, and updated together by eq. 2 with BBᵀ and EᵀE masked to their block diagonal:

        E ← E ⊙ (ABᵀ) / (E mask(BBᵀ)),    B ← B ⊙ (EᵀA) / (mask(EᵀE) B),

    which is eq. 2 of each p on its own block. Each (class, p) block starts from the init of
    ``nmf(A, p, seed=seed)``, stops on the rule of eq. 3 and is frozen from then on, so ``[p]``
    of the result equals ``nmf(A, p, ...)``: same ``n_iter``, factors to float rounding (the
    matrix products are summed in another order). In float32 that rounding can tip a block whose
    relative drop lands within ~1e-7·||A||²/err_0 of ``tol``, which then stops one update apart
    from its own call, as it may between two devices.

    Parameters
    ----------
    A : Tensor of shape (n, D) or (C, n, D), as in :func:`nmf`.
    ps : sequence of distinct ints, the prototype counts, each 1 <= p <= D.
    max_iter, tol, seed, n_rows, block_rows, device : as in :func:`nmf`.

    Returns
    -------
    dict mapping each p (in the order of ``ps``) to its :class:`NMFResult`.
    """
    ps = _check_ps(ps, _check_A(A))
    return _fit(A, ps, max_iter=max_iter, tol=tol, seed=seed, n_rows=n_rows, block_rows=block_rows, device=device)
