"""ProtoNMF's two steps for a batch of classes: NMF prototypes, then the head rebuilt from them.

Step 1 (eq. 1–3): A_c ≈ E_c B_c by :func:`protonmf.nmf.nmf`, batched over classes (or by
:func:`protonmf.nmf.nmf_sweep` for several p in one pass, see :func:`fit_prototypes_sweep`).
Step 2 (eq. 4–5, 8): C_c, R_c by :func:`protonmf.head.reconstruct_head`, and the augmented
prototypes B'_c by :func:`protonmf.head.augment_prototypes` (``residual="equal"``, ProtoNMF), or
with the residual split into pieces shaped like each prototype's heatmap
(``residual="distributed"``, Tan et al. 2024: :func:`protonmf.head.distribute_residual`).

Shapes follow :mod:`protonmf.nmf` and :mod:`protonmf.head`: K classes, p prototypes, D channels.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from protonmf.head import (
    RESIDUALS,
    Residual,
    Solver,
    absorb_residual_pieces,
    augment_prototypes,
    distribute_residual,
    reconstruct_head,
)
from protonmf.nmf import NMFResult, nmf, nmf_sweep
from protonmf.prototypes.gallery import TopCodes, top_codes
from protonmf.prototypes.where import prototype_codes

__all__ = [
    "ClassPrototypes", "fit_classes", "fit_classes_and_codes", "fit_prototypes", "fit_prototypes_sweep", "fit_settings",
    "head_from_prototypes", "residual_only",
    "stack_classes",
]


@dataclass(frozen=True)
class ClassPrototypes:
    """The fitted prototypes of K classes for one prototype count p.

    Attributes
    ----------
    B : (K, p, D) float32, NMF prototypes (eq. 1).
    C : (K, p) float64, their coefficients in each class's head (eq. 4).
    R : (K, D) float64, residual prototypes (eq. 5).
    B_aug : (K, p, D) float64, augmented prototypes b_i + R/Σa (eq. 8), or b_i + r_i/a_i with the
        residual's pieces r_i (``residual="distributed"``); either way Σ_i a_i b'_i = V_c.
    spread : (K,) bool, whether R was spread over the prototypes (Σa ≠ 0; for "distributed": every a_i ≠ 0).
    bias : (K,) float64, the head's bias.
    feature_error : (K,) float64, ||A − EB||² / ||A||².
    head_error : (K,) float64, ||V − CB||² / ||V||².
    n_iter : (K,) int64, NMF updates run.
    n_rows : (K,) int64, feature rows (images × h × w) each class was fitted on.
    """

    B: Tensor
    C: Tensor
    R: Tensor
    B_aug: Tensor
    spread: Tensor
    bias: Tensor
    feature_error: Tensor
    head_error: Tensor
    n_iter: Tensor
    n_rows: Tensor

    @property
    def p(self) -> int:
        return self.B.shape[1]

    @property
    def num_classes(self) -> int:
        return self.B.shape[0]

    def to_tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name).detach().cpu().clone() for f in fields(self)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "ClassPrototypes":
        missing = [f.name for f in fields(cls) if f.name not in tensors]
        if missing:
            raise ValueError(f"prototype tensors are missing {missing}")
        return cls(**{f.name: tensors[f.name] for f in fields(cls)})

    @classmethod
    def concat(cls, parts: Sequence["ClassPrototypes"]) -> "ClassPrototypes":
        """Classes of several fits, in order (e.g. the groups of a distributed fit)."""
        if not parts:
            raise ValueError("no prototype groups to concatenate")
        if len({part.p for part in parts}) != 1:
            raise ValueError(f"cannot concatenate fits of different p: {sorted({part.p for part in parts})}")
        return cls(**{f.name: torch.cat([getattr(part, f.name).cpu() for part in parts]) for f in fields(cls)})


def stack_classes(features: Sequence[Tensor], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Pad per-class features into one batch, made on ``device`` (default: the first class's):
    moved there once, so the NMF's every pass over A reads it where it runs.

    Parameters
    ----------
    features : sequence of K tensors of shape (n_c, h, w, D) or (rows_c, D)
    device : where A is made.

    Returns
    -------
    A : Tensor of shape (K, max rows, D), zero-padded, in the dtype of the inputs.
    n_rows : Tensor of shape (K,), int64.
    """
    if not features:
        raise ValueError("features: no classes given")
    flat = []
    for k, F in enumerate(features):
        if F.ndim not in (2, 4):
            raise ValueError(f"features of class {k} must have shape (n, h, w, D) or (rows, D), got {tuple(F.shape)}")
        flat.append(F.reshape(-1, F.shape[-1]))
    dims = {F.shape[-1] for F in flat}
    if len(dims) != 1:
        raise ValueError(f"features of different classes have different D: {sorted(dims)}")
    n_rows = torch.tensor([F.shape[0] for F in flat], dtype=torch.int64)
    empty = (n_rows == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"features: class(es) {empty} have no images (empty class)")
    A = flat[0].new_zeros(len(flat), int(n_rows.max()), dims.pop(), device=device)
    for k, F in enumerate(flat):
        A[k, : F.shape[0]] = F.to(A.device, non_blocking=True)
    return A, n_rows


def fit_settings(**overrides: Any) -> dict[str, Any]:
    """The settings a fit ran with (defaults of :func:`fit_prototypes` plus ``overrides``), for manifests."""
    defaults = {
        name: param.default
        for name, param in inspect.signature(fit_prototypes).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("n_rows", "device", "block_rows")
    }
    settings = {**defaults, **{k: v for k, v in overrides.items() if k not in ("device", "block_rows")}}
    if settings.get("residual") == "equal":  # ProtoNMF's default: absent, so earlier fit keys and manifests stay
        del settings["residual"]
    return {**settings, "nmf_input": "negative features set to 0 (ProtoNMF §3.1)"}


def _check_fit_inputs(A: Tensor, V: Tensor, residual: str = "equal") -> None:
    if residual not in RESIDUALS:
        raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
    if A.ndim != 3:
        raise ValueError(f"A must have shape (K, n, D), got {tuple(A.shape)}")
    if V.ndim != 2 or V.shape[0] != A.shape[0]:
        raise ValueError(f"V must have shape (K={A.shape[0]}, D), got {tuple(V.shape)}")
    if V.shape[1] != A.shape[2]:
        raise ValueError(
            f"feature dimension mismatch: features have D = {A.shape[2]} but the head V has D = {V.shape[1]}"
        )
    if not torch.isfinite(V).all():
        raise ValueError("V (head weights) contains NaN or Inf values")


def _head_prototypes(
    res: NMFResult, V: Tensor, bias: Tensor | None, n_rows: Tensor, *, nonneg: bool, solver: Solver,
    residual: Residual, A: Tensor,
) -> ClassPrototypes:
    """Step 2 for the NMF prototypes ``res.B`` (K, p, D): the head rebuilt from them (eq. 4–5, 8).

    ``n_rows`` (K,) int64 is recorded as the rows each class was fitted on; ``A`` (K, n, D), the
    features, is read only for ``residual="distributed"`` (the prototypes' heatmaps).
    """
    head = reconstruct_head(V.to(res.B.device), res.B, nonneg=nonneg, solver=solver)  # eq. 4–5
    if residual == "distributed":
        pieces = distribute_residual(A, res.B, head.R)  # Tan et al.: Σ_i r_i = R
        B_aug, spread = absorb_residual_pieces(res.B, head.C, pieces)
    else:
        B_aug, spread = augment_prototypes(res.B, head.C, head.R)  # eq. 8
    K = res.B.shape[0]
    return ClassPrototypes(
        B=res.B.float(),
        C=head.C,
        R=head.R,
        B_aug=B_aug,
        spread=spread,
        bias=(bias if bias is not None else torch.zeros(K)).double().to(res.B.device),
        feature_error=res.relative_error,
        head_error=head.relative_error,
        n_iter=res.n_iter,
        n_rows=n_rows.to(res.B.device),
    )


def _row_counts(A: Tensor, n_rows: Tensor | None) -> Tensor:
    K, n = A.shape[:2]
    return torch.full((K,), n, dtype=torch.int64) if n_rows is None else torch.as_tensor(n_rows, dtype=torch.int64)


def fit_prototypes(
    A: Tensor,
    V: Tensor,
    bias: Tensor | None,
    p: int,
    *,
    n_rows: Tensor | None = None,
    max_iter: int = 200,
    tol: float = 1e-4,
    seed: int = 0,
    nonneg: bool = False,
    solver: Solver = "closed_form",
    residual: Residual = "equal",
    block_rows: int = 8192,
    device: torch.device | str | None = None,
) -> tuple[ClassPrototypes, NMFResult]:
    """Fit p prototypes per class and rebuild each class's head row from them.

    Parameters
    ----------
    A : Tensor of shape (K, n, D), features of K classes (zero-padded; see :func:`stack_classes`).
    V : Tensor of shape (K, D), the head rows of these K classes.
    bias : Tensor of shape (K,) or None.
    p : int, prototypes per class.
    residual : "equal" (eq. 8, ProtoNMF) or "distributed" (Tan et al.; see :func:`protonmf.head.distribute_residual`).
    Other parameters: as :func:`protonmf.nmf.nmf` and :func:`protonmf.head.reconstruct_head`.

    Returns
    -------
    (ClassPrototypes, NMFResult): the model part, and the NMF factors (E for heatmaps).
    """
    _check_fit_inputs(A, V, residual)
    res = nmf(A, p, max_iter=max_iter, tol=tol, seed=seed, n_rows=n_rows, block_rows=block_rows, device=device)  # eq. 1–3
    rows = _row_counts(A, n_rows)
    return _head_prototypes(res, V, bias, rows, nonneg=nonneg, solver=solver, residual=residual, A=A), res


def fit_prototypes_sweep(
    A: Tensor,
    V: Tensor,
    bias: Tensor | None,
    ps: Sequence[int],
    *,
    n_rows: Tensor | None = None,
    max_iter: int = 200,
    tol: float = 1e-4,
    seed: int = 0,
    nonneg: bool = False,
    solver: Solver = "closed_form",
    residual: Residual = "equal",
    block_rows: int = 8192,
    device: torch.device | str | None = None,
) -> dict[int, tuple[ClassPrototypes, NMFResult]]:
    """:func:`fit_prototypes` for every p in ``ps``, with one NMF pass over A per iteration for all p.

    The NMF of every p runs in one :func:`protonmf.nmf.nmf_sweep` (same factors and ``n_iter`` as
    separate :func:`protonmf.nmf.nmf` calls, to float rounding); the head is then rebuilt per p.

    Parameters
    ----------
    A, V, bias : as in :func:`fit_prototypes`.
    ps : sequence of distinct ints, the prototype counts.
    Other parameters: as :func:`fit_prototypes`.

    Returns
    -------
    dict mapping each p (in the order of ``ps``) to what ``fit_prototypes(A, V, bias, p, ...)`` returns.
    """
    _check_fit_inputs(A, V, residual)
    sweep = nmf_sweep(A, ps, max_iter=max_iter, tol=tol, seed=seed, n_rows=n_rows, block_rows=block_rows, device=device)  # eq. 1–3
    rows = _row_counts(A, n_rows)
    return {p: (_head_prototypes(res, V, bias, rows, nonneg=nonneg, solver=solver, residual=residual, A=A), res)
            for p, res in sweep.items()}


def head_from_prototypes(
    A: Tensor,
    V: Tensor,
    bias: Tensor | None,
    B: Tensor,
    *,
    n_rows: Tensor | None = None,
    nonneg: bool = False,
    solver: Solver = "closed_form",
    residual: Residual = "equal",
) -> ClassPrototypes:
    """Step 2 alone, for prototypes B found by any means (another NMF solver, initialisation or
    penalty): the head rebuilt from them (eq. 4–5, 8), so the model is exact whatever B is.

    Parameters
    ----------
    A : (K, n, D) the classes' features (zero-padded, :func:`stack_classes`); read for the
        features' reconstruction error (E the codes of :mod:`protonmf.prototypes.where`) and, for
        ``residual="distributed"``, the prototypes' heatmaps.
    V, bias : the head rows and bias of these K classes. B : (K, p, D), non-negative.
    n_rows, nonneg, solver, residual : as in :func:`fit_prototypes`.

    Returns
    -------
    ClassPrototypes, with ``n_iter`` 0 (no NMF update ran here).
    """
    _check_fit_inputs(A, V, residual)
    if B.ndim != 3 or B.shape[0] != A.shape[0] or B.shape[2] != A.shape[2] or (B < 0).any():
        raise ValueError(f"B must be non-negative with shape (K={A.shape[0]}, p, D={A.shape[2]}), got {tuple(B.shape)}")
    E = prototype_codes(A, B.float())
    Bd = B.double().to(E.device)
    error = torch.stack([(A[k].double().clamp_min(0) - E[k].double() @ Bd[k]).square().sum() for k in range(A.shape[0])])
    norm_A = A.double().clamp_min(0).square().sum((1, 2))
    res = NMFResult(E=E, B=B.float(), error=error, init_error=error, norm_A=norm_A,
                    n_iter=torch.zeros(A.shape[0], dtype=torch.int64), history=error[:, None])
    return _head_prototypes(res, V, bias, _row_counts(A, n_rows), nonneg=nonneg, solver=solver, residual=residual, A=A)


def residual_only(V: Tensor, bias: Tensor | None, p: int) -> ClassPrototypes:
    """Classes with no feature rows (every image of theirs unreadable): no prototypes, the head
    kept whole by the residual, so the model stays exact.

    B = 0 and C = 0, so R = V − C B = V (eq. 5); Σa = 0 leaves R unspread (``spread`` False,
    B_aug = B = 0), and the class's logit is the residual term of eq. 7: bias + mean_hw(F)·Vᵀ.
    ``feature_error`` is 0 (nothing to reconstruct), ``head_error`` 1 (no part of V is in
    prototypes), ``n_iter`` and ``n_rows`` 0.

    Parameters
    ----------
    V : Tensor of shape (K, D), the head rows of these K classes.
    bias : Tensor of shape (K,) or None.
    p : int, the prototype count of the fit they join.
    """
    K, D = V.shape
    zeros = torch.zeros(K, dtype=torch.float64, device=V.device)
    return ClassPrototypes(
        B=torch.zeros(K, p, D, device=V.device),
        C=torch.zeros(K, p, dtype=torch.float64, device=V.device),
        R=V.double(),
        B_aug=torch.zeros(K, p, D, dtype=torch.float64, device=V.device),
        spread=torch.zeros(K, dtype=torch.bool, device=V.device),
        bias=(bias if bias is not None else zeros).double(),
        feature_error=zeros,
        head_error=torch.where(V.double().square().sum(1) > 0, 1.0, 0.0),
        n_iter=torch.zeros(K, dtype=torch.int64, device=V.device),
        n_rows=torch.zeros(K, dtype=torch.int64, device=V.device),
    )


def fit_classes(
    features: Sequence[Tensor], V: Tensor, bias: Tensor | None, ps: Sequence[int], **fit_kwargs: Any
) -> dict[int, ClassPrototypes]:
    """:func:`fit_prototypes_sweep` on per-class features, where a class may have no rows at all.

    Classes with rows are stacked (:func:`stack_classes`) and fitted; a class without is
    :func:`residual_only`, at its place.

    Parameters
    ----------
    features : sequence of K tensors of shape (n_c, h, w, D) or (rows_c, D); rows_c may be 0.
    V : Tensor of shape (K, D); bias : Tensor of shape (K,) or None.
    ps : the prototype counts; ``fit_kwargs`` as in :func:`fit_prototypes_sweep` (but ``n_rows``).

    Returns
    -------
    dict mapping each p to the :class:`ClassPrototypes` of the K classes, in their order.
    """
    return fit_classes_and_codes(features, V, bias, ps, top_k=0, **fit_kwargs)[0]


def fit_classes_and_codes(
    features: Sequence[Tensor], V: Tensor, bias: Tensor | None, ps: Sequence[int], *, top_k: int, **fit_kwargs: Any
) -> tuple[dict[int, ClassPrototypes], dict[int, TopCodes]]:
    """:func:`fit_classes`, and the ``top_k`` largest codes of every prototype on the training rows
    (:func:`~protonmf.prototypes.gallery.top_codes` of :func:`~protonmf.prototypes.where.prototype_codes`
    for the fitted B: the gallery, from the features this fit holds, by the definition the heatmaps use).

    Returns
    -------
    (p → :class:`ClassPrototypes`, p → :class:`~protonmf.prototypes.gallery.TopCodes`), classes in their order.
    """
    rows = [int(F.reshape(-1, F.shape[-1]).shape[0]) for F in features]
    full = [k for k, n in enumerate(rows) if n > 0]
    empty = [k for k, n in enumerate(rows) if n == 0]
    bias_of = (lambda idx: None) if bias is None else (lambda idx: bias[idx])
    parts: dict[int, list[ClassPrototypes]] = {p: [] for p in ps}
    codes: dict[int, list[TopCodes]] = {p: [] for p in ps}
    if full:
        A, n_rows = stack_classes([features[k] for k in full], device=fit_kwargs.get("device"))
        for p, (fit, res) in fit_prototypes_sweep(A, V[full], bias_of(full), ps, n_rows=n_rows, **fit_kwargs).items():
            parts[p].append(fit)
            if top_k > 0:  # the gallery: the top of where each prototype is (protonmf.prototypes.where) on the training rows
                codes[p].append(top_codes(prototype_codes(A, fit.B, init=res.E), n_rows, top_k))
            else:
                codes[p].append(TopCodes.empty(len(full), p, 0))
    for p in ps:
        if empty:
            parts[p].append(residual_only(V[empty], bias_of(empty), p))
            codes[p].append(TopCodes.empty(len(empty), p, top_k))
    order = torch.argsort(torch.tensor(full + empty))  # back to the classes' own order (concat is on the CPU)
    fits = {p: ClassPrototypes(**{f.name: getattr(ClassPrototypes.concat(parts[p]), f.name)[order] for f in fields(ClassPrototypes)})
            for p in ps}
    return fits, {p: TopCodes.concat(codes[p]).take(order) for p in ps}
