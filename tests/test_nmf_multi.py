"""Several p in one NMF pass (nmf_sweep, fit_prototypes_sweep): each p equals its own nmf call."""

import pytest
import torch

from protonmf.prototypes.fit import fit_prototypes, fit_prototypes_sweep
from protonmf.nmf import nmf, nmf_sweep

PS = (5, 1, 10, 3)  # not sorted: the order of ps must not matter
SIZES = (300, 170, 240)


def padded_classes(sizes=SIZES, D=32, r=6, dtype=torch.float64, seed=0):
    """Noisy rank-r non-negative classes of ``sizes`` rows, zero-padded into one (C, n, D) batch."""
    g = torch.Generator().manual_seed(seed)
    A = torch.zeros(len(sizes), max(sizes), D, dtype=torch.float64)
    for c, m in enumerate(sizes):
        E, B = torch.rand(m, r, generator=g, dtype=torch.float64), torch.rand(r, D, generator=g, dtype=torch.float64)
        A[c, :m] = E @ B + 0.1 * torch.rand(m, D, generator=g, dtype=torch.float64)
    return A.to(dtype), torch.tensor(sizes)


def assert_same_as_separate(sweep, separate, rtol):
    for p, alone in separate.items():
        got = sweep[p]
        assert got.E.shape == alone.E.shape and got.B.shape == alone.B.shape
        assert torch.equal(got.n_iter, alone.n_iter), f"p={p}: n_iter {got.n_iter} vs {alone.n_iter}"
        for name in ("E", "B"):
            want = getattr(alone, name)
            torch.testing.assert_close(getattr(got, name), want, rtol=rtol, atol=rtol * float(want.abs().max()))
        # The error is ||A||² − 2⟨EᵀA, B⟩ + ⟨EᵀE, BBᵀ⟩: its rounding is relative to ||A||².
        scale = rtol * float(alone.norm_A.max())
        torch.testing.assert_close(got.error, alone.error, rtol=rtol, atol=scale)
        torch.testing.assert_close(got.init_error, alone.init_error, rtol=rtol, atol=scale)
        torch.testing.assert_close(got.history, alone.history, rtol=rtol, atol=scale, equal_nan=True)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_sweep_equals_separate_calls_on_padded_classes(dtype, rtol):
    A, rows = padded_classes(dtype=dtype)
    kwargs = {"max_iter": 400, "tol": 3e-4, "n_rows": rows, "block_rows": 64}
    sweep = nmf_sweep(A, PS, **kwargs)
    separate = {p: nmf(A, p, **kwargs) for p in PS}
    assert list(sweep) == list(PS)
    n_iter = torch.stack([separate[p].n_iter for p in PS])  # (G, C)
    # The blocks stop at different iterations, so freezing a converged block is exercised.
    assert all(len(set(n_iter[:, c].tolist())) > 1 for c in range(len(SIZES))), n_iter
    assert int(n_iter.max()) < 400 and int(n_iter.min()) > 1
    assert_same_as_separate(sweep, separate, rtol)
    for c, m in enumerate(SIZES):
        assert all((sweep[p].E[c, m:] == 0).all() for p in PS), "padding rows stay 0"


def test_sweep_with_fixed_iterations_runs_every_block_to_max_iter():
    A, rows = padded_classes(sizes=(120, 90), D=16)
    sweep = nmf_sweep(A, (2, 4), max_iter=25, tol=0, n_rows=rows)
    separate = {p: nmf(A, p, max_iter=25, tol=0, n_rows=rows) for p in (2, 4)}
    assert all(sweep[p].n_iter.tolist() == [25, 25] for p in (2, 4))
    assert_same_as_separate(sweep, separate, 1e-10)


def test_sweep_of_float16_features_equals_separate_calls():
    A, rows = padded_classes(dtype=torch.float32, seed=3)
    half = A.half()
    kwargs = {"max_iter": 300, "tol": 3e-4, "n_rows": rows, "block_rows": 100}
    sweep = nmf_sweep(half, (1, 3, 5), **kwargs)
    separate = {p: nmf(half, p, **kwargs) for p in (1, 3, 5)}
    assert all(sweep[p].E.dtype == torch.float32 and sweep[p].B.dtype == torch.float32 for p in (1, 3, 5))
    assert_same_as_separate(sweep, separate, 1e-5)


def test_sweep_of_one_matrix_drops_the_class_axis():
    A, _ = padded_classes(sizes=(200,), D=20)
    sweep = nmf_sweep(A[0], [2, 6], max_iter=100, tol=3e-4)
    assert sweep[2].E.shape == (200, 2) and sweep[6].B.shape == (6, 20) and sweep[6].n_iter.ndim == 0
    assert_same_as_separate(sweep, {p: nmf(A[0], p, max_iter=100, tol=3e-4) for p in (2, 6)}, 1e-10)


def test_sweep_of_one_p_is_nmf_itself():
    A, rows = padded_classes()
    one = nmf_sweep(A, [3], n_rows=rows)[3]
    alone = nmf(A, 3, n_rows=rows)
    assert torch.equal(one.B, alone.B) and torch.equal(one.E, alone.E) and torch.equal(one.n_iter, alone.n_iter)


@pytest.mark.parametrize(
    "ps, message",
    [
        ([], "ps (prototype counts) is empty"),
        ([3, 1, 3], "ps (prototype counts) has duplicates [3]"),
        ([1, 9], "ps[1] (number of prototypes) = 9 exceeds the feature dimension D = 8"),
        ([0, 2], "ps[0] (number of prototypes) must be >= 1, got 0"),
        ([2.5], "ps[0] (number of prototypes) must be an integer, got 2.5"),
        (3, "ps (prototype counts) must be a sequence of integers, got 3"),
    ],
)
def test_bad_prototype_counts_are_a_value_error_naming_ps(ps, message):
    with pytest.raises(ValueError) as err:
        nmf_sweep(torch.rand(10, 8), ps)
    assert message in str(err.value)


def test_fit_prototypes_sweep_equals_fit_prototypes_per_p():
    A, rows = padded_classes(dtype=torch.float32, seed=5)
    g = torch.Generator().manual_seed(7)
    V = torch.randn(len(SIZES), A.shape[2], generator=g)
    bias = torch.randn(len(SIZES), generator=g)
    kwargs = {"n_rows": rows, "max_iter": 300, "tol": 3e-4, "seed": 2}
    sweep = fit_prototypes_sweep(A, V, bias, PS, **kwargs)
    assert list(sweep) == list(PS)
    for p in PS:
        want, want_res = fit_prototypes(A, V, bias, p, **kwargs)
        got, got_res = sweep[p]
        assert got.p == p and torch.equal(got.n_iter, want.n_iter) and torch.equal(got.n_rows, want.n_rows)
        assert torch.equal(got.bias, want.bias) and torch.equal(got.spread, want.spread)
        for name in ("B", "C", "R", "B_aug", "feature_error", "head_error"):
            a, b = getattr(got, name), getattr(want, name)
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5 * float(b.abs().max()))
        torch.testing.assert_close(got_res.E, want_res.E, rtol=1e-5, atol=1e-5 * float(want_res.E.abs().max()))
    # The head rows are exact by construction (eq. 8): Σ_i a_i b'_i = V.
    for p in PS:
        fit = sweep[p][0]
        torch.testing.assert_close((fit.C.unsqueeze(1) @ fit.B_aug).squeeze(1), V.double(), rtol=1e-9, atol=1e-9)
