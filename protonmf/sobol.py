"""Concept importance by total Sobol indices (CRAFT §3.3, Definition 3.1), Jansen estimator.

Notation. The concepts follow :mod:`protonmf.nmf`: ``U`` of shape (N, r) the concept coefficients
of N images (CRAFT's U, our E) and ``W`` of shape (r, D) the concept bank **with one concept per
row** (our B). CRAFT writes the bank as a (D, r) matrix and activations as A ≈ U Wᵀ; ours is its
transpose, so activations are A ≈ U W. ``h`` (``head``) is the rest of the network, activations
(..., D) → logits (..., K).

Perturbation. A mask M ∈ [0, 1]^r scales the coefficients, τ(U, M) = U ⊙ M, and the model output is
Y = h((U ⊙ M) W)[class]. The total Sobol index of concept i (CRAFT eq. 2) is

    S_i^T = E_{M~i}[ Var_{M_i}(Y | M~i) ] / Var(Y),      M ~ U([0, 1]^r),

the share of Var(Y) that concept i explains alone or through interactions with other concepts.

Estimator (Jansen 1999; Saltelli et al. 2010; CRAFT App. D). Draw two (n_design, d) matrices
A and B from one quasi-Monte-Carlo sequence of dimension 2d (A its first d columns, B its last d),
and for each i the matrix A_B^i: A with column i taken from B. A row of A and the same row of A_B^i
differ in coordinate i only, so ½E[(f(A) − f(A_B^i))²] = E[Var(Y | M~i)] and

    S_i^T ≈ mean_k (f(A_k) − f(A_B^i_k))² / (2 V),      V = var(f(A) ∪ f(B)).

Design order, used by :func:`sobol_masks` and undone by :func:`split_sobol_outputs`: the rows are
``[A; B; A_B^1; …; A_B^d]``, n_design rows per block, n_design·(d + 2) rows in all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from scipy.stats import qmc
from torch import Tensor

__all__ = ["concept_importance", "sobol_masks", "split_sobol_outputs", "total_sobol_indices"]

QMCSequence = Literal["sobol", "halton"]


def _check_design(n_design: int, d: int) -> None:
    if not isinstance(n_design, (int, np.integer)) or isinstance(n_design, bool) or n_design < 2:
        raise ValueError(f"n_design must be an integer ≥ 2, got {n_design!r}")
    if not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 1:
        raise ValueError(f"d must be an integer ≥ 1, got {d!r}")


def sobol_masks(n_design: int, d: int, *, seed: int = 0, sequence: QMCSequence = "sobol") -> Tensor:
    """Quasi-Monte-Carlo design of the Jansen estimator: rows ``[A; B; A_B^1; …; A_B^d]``.

    Parameters
    ----------
    n_design : number of rows of A (and of B, and of each A_B^i), ≥ 2. Sobol points keep their
        balance properties only for powers of 2 (scipy warns otherwise).
    d : number of inputs (concepts), ≥ 1.
    seed : seed of the scrambling.
    sequence : "sobol" (scrambled Sobol', as CRAFT) or "halton" (scrambled Halton).

    Returns
    -------
    masks : Tensor of shape (n_design * (d + 2), d), float64, entries in [0, 1). Block k (rows
        k·n_design to (k + 1)·n_design) is A for k = 0, B for k = 1 and A_B^(k−1) for k ≥ 2.
    """
    _check_design(n_design, d)
    # A Generator passed as `seed` gives the same points on scipy 1.11 and on ≥ 1.15 (where `rng`
    # is the new name); an int `seed` does not.
    rng = np.random.default_rng(seed)
    if sequence == "sobol":
        engine = qmc.Sobol(2 * d, scramble=True, seed=rng)
    elif sequence == "halton":
        engine = qmc.Halton(2 * d, scramble=True, seed=rng)
    else:
        raise ValueError(f"sequence must be 'sobol' or 'halton', got {sequence!r}")
    points = torch.from_numpy(engine.random(n_design))  # (n_design, 2d)
    A, B = points[:, :d], points[:, d:]
    AB = A.unsqueeze(0).repeat(d, 1, 1)  # (d, n_design, d)
    idx = torch.arange(d)
    AB[idx, :, idx] = B.T  # A_B^i: column i of A replaced by column i of B
    return torch.cat([A, B, AB.reshape(d * n_design, d)])


def split_sobol_outputs(f_values: Tensor, n_design: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
    """Outputs on the design of :func:`sobol_masks`, split back into f(A), f(B) and f(A_B^i).

    Parameters
    ----------
    f_values : Tensor of shape (n_design * (d + 2), *batch)

    Returns
    -------
    f_A, f_B : Tensors of shape (n_design, *batch)
    f_AB : Tensor of shape (d, n_design, *batch); f_AB[i] = f(A_B^i).
    """
    _check_design(n_design, d)
    if f_values.ndim < 1 or f_values.shape[0] != n_design * (d + 2):
        raise ValueError(
            f"f_values must have n_design * (d + 2) = {n_design * (d + 2)} rows "
            f"(n_design = {n_design}, d = {d}), got shape {tuple(f_values.shape)}"
        )
    batch = f_values.shape[1:]
    f_A, f_B = f_values[:n_design], f_values[n_design : 2 * n_design]
    f_AB = f_values[2 * n_design :].reshape(d, n_design, *batch)
    return f_A, f_B, f_AB


def total_sobol_indices(f_values: Tensor, n_design: int, d: int) -> Tensor:
    """Total Sobol indices S_i^T by the Jansen estimator, batched over trailing axes (CRAFT eq. 2).

        S_i^T = mean_k (f(A_k) − f(A_B^i_k))² / (2 var(f(A) ∪ f(B)))

    Parameters
    ----------
    f_values : Tensor of shape (n_design * (d + 2), *batch): the model evaluated on the rows of
        :func:`sobol_masks`, in its order; each trailing index (e.g. an image) is its own problem.
    n_design, d : the design's size, as given to :func:`sobol_masks`.

    Returns
    -------
    ST : Tensor of shape (d, *batch). Where the output does not vary at all (V = 0), no input
        explains any variance and S_i^T is 0 for every i.
    """
    f_A, f_B, f_AB = split_sobol_outputs(f_values, n_design, d)
    dtype = f_values.dtype if f_values.is_floating_point() else torch.get_default_dtype()
    f_A, f_B, f_AB = f_A.to(dtype), f_B.to(dtype), f_AB.to(dtype)
    var = torch.cat([f_A, f_B]).var(dim=0, correction=0)  # (*batch)
    expected_var = 0.5 * (f_A.unsqueeze(0) - f_AB).pow(2).mean(dim=1)  # (d, *batch): E[Var(Y | M~i)]
    return torch.where(var > 0, expected_var / torch.where(var > 0, var, 1), torch.zeros_like(expected_var))


def concept_importance(
    U: Tensor,
    W: Tensor,
    head: Callable[[Tensor], Tensor],
    class_idx: int | Sequence[int] | Tensor,
    *,
    n_design: int = 32,
    seed: int = 0,
    sequence: QMCSequence = "sobol",
    batch_size: int = 8192,
) -> Tensor:
    """Mean over images of each concept's total Sobol index for one class logit (CRAFT §3.3).

    For image n and mask M (rows of :func:`sobol_masks`), Y_n(M) = head((U_n ⊙ M) W)[class_n];
    S_i^T is estimated per image by :func:`total_sobol_indices` and averaged over the N images.

    Parameters
    ----------
    U : Tensor of shape (N, r), or (N, *positions, r): concept coefficients of N images (CRAFT's
        U, our E), pooled or per position of a feature map; a mask scales concept i at every
        position of an image alike.
    W : Tensor of shape (r, D): the concept bank, one concept per row (our B; CRAFT's Wᵀ).
    head : maps activations (m, D), or (m, *positions, D), to logits (m, K): the rest of the network.
    class_idx : the logit to explain, an int for all images or one per image, shape (N,).
    n_design, seed, sequence : the QMC design (:func:`sobol_masks`); n_design·(r + 2) masks.
    batch_size : (image, mask) pairs sent to ``head`` at once.

    Returns
    -------
    importance : Tensor of shape (r,), in U's floating dtype (float32 for integer U). Images whose
        logit does not vary under the masks add 0 to every concept's mean.
    """
    if U.ndim < 2 or W.ndim != 2 or U.shape[-1] != W.shape[0]:
        raise ValueError(f"U and W must have shapes (N, ..., r) and (r, D), got {tuple(U.shape)}, {tuple(W.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    N, r = U.shape[0], U.shape[-1]
    spread = (1,) * (U.ndim - 2)  # a mask broadcasts over the positions
    dtype = U.dtype if U.is_floating_point() else torch.get_default_dtype()
    U, W = U.to(dtype), W.to(dtype=dtype, device=U.device)
    classes = torch.as_tensor(class_idx, dtype=torch.long, device=U.device)
    if classes.ndim == 0:
        classes = classes.expand(N)
    elif classes.shape != (N,):
        raise ValueError(f"class_idx must be an int or have shape (N,) = ({N},), got {tuple(classes.shape)}")
    masks = sobol_masks(n_design, r, seed=seed, sequence=sequence).to(dtype=dtype, device=U.device)
    n_masks = masks.shape[0]

    # Pairs (image n, mask m) are laid out flat, image-major, so that a chunk may span images and
    # masks alike: one head call per batch_size pairs, whatever N and n_masks are.
    outputs = torch.empty(N * n_masks, dtype=dtype, device=U.device)
    with torch.no_grad():
        for start in range(0, N * n_masks, batch_size):
            flat = torch.arange(start, min(start + batch_size, N * n_masks), device=U.device)
            img, m = flat // n_masks, flat % n_masks
            tau = U[img] * masks[m].view(-1, *spread, r)  # τ(U, M) = U ⊙ M (CRAFT eq. 2)
            activations = tau @ W  # Ã = τ(U, M) W: (chunk, [positions,] D)
            logits = head(activations)
            if logits.ndim != 2 or logits.shape[0] != flat.shape[0]:
                raise ValueError(
                    f"head must map activations (m, ..., D) to logits (m, K); got {tuple(logits.shape)} "
                    f"for input {tuple(activations.shape)}"
                )
            outputs[start : start + flat.shape[0]] = logits.gather(1, classes[img].unsqueeze(1)).squeeze(1).to(dtype)
    ST = total_sobol_indices(outputs.reshape(N, n_masks).T, n_design, r)  # (r, N)
    return ST.mean(dim=1)
