"""NMF (ProtoNMF eq. 1–3): monotone, matches scikit-learn, recovers a planted factorization, batches exactly."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import NMF as SkNMF

from protonmf.nmf import nmf


def planted(n=600, D=48, p=4, seed=0, dtype=torch.float64):
    """A = E0 B0 with each prototype owning a few channels of its own, so the factorization is unique."""
    g = torch.Generator().manual_seed(seed)
    E0 = torch.rand(n, p, generator=g, dtype=dtype)
    E0 = E0 * (torch.rand(n, p, generator=g, dtype=dtype) < 0.6)
    B0 = torch.rand(p, D, generator=g, dtype=dtype) * (torch.rand(p, D, generator=g, dtype=dtype) < 0.5)
    own = torch.arange(D) % (p + 2)  # channels k with own == i (< p) belong to prototype i alone
    for i in range(p):
        B0[:, own == i] = 0
        B0[i, own == i] = 1.0 + torch.rand(int((own == i).sum()), generator=g, dtype=dtype)
    return E0, B0, E0 @ B0


def noisy_low_rank(n=400, D=32, r=6, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(n, r, generator=g, dtype=dtype) @ torch.rand(r, D, generator=g, dtype=dtype)
    return A + 0.1 * torch.rand(n, D, generator=g, dtype=dtype)


def test_error_never_increases_and_matches_direct_computation():
    A = noisy_low_rank()
    res = nmf(A, 3, max_iter=150, tol=0)
    h = res.history
    assert res.n_iter == 150 and torch.isfinite(h).all()
    assert (h[1:] <= h[:-1] * (1 + 1e-12)).all(), "multiplicative updates must not increase ||A - EB||^2"
    direct = ((A - res.E @ res.B) ** 2).sum()
    assert torch.allclose(res.error, direct, rtol=1e-9)
    assert torch.allclose(res.norm_A, (A**2).sum(), rtol=1e-12)
    assert (res.E >= 0).all() and (res.B >= 0).all()


def test_same_objective_as_sklearn_mu_from_the_same_start():
    A = noisy_low_rank(n=500, D=40, seed=3)
    start = nmf(A, 4, max_iter=0)
    ours = nmf(A, 4, max_iter=200, tol=0, init=(start.E, start.B))
    sk = SkNMF(n_components=4, solver="mu", init="custom", max_iter=200, tol=0)
    W = sk.fit_transform(A.numpy(), W=start.E.numpy().copy(), H=start.B.numpy().copy())
    sk_err = float(((A.numpy() - W @ sk.components_) ** 2).sum())
    assert abs(float(ours.error) - sk_err) / sk_err < 0.01
    # Same update rule from the same start: the factors agree too, not only the objective.
    np.testing.assert_allclose(ours.B.numpy(), sk.components_, rtol=1e-3, atol=1e-8)


def test_recovers_a_planted_exact_factorization():
    E0, B0, A = planted()
    res = nmf(A, 4, max_iter=3000, tol=0)
    assert float(res.relative_error) < 1e-5
    # Each planted prototype is found (up to order and scale): matched cosine similarity ~1.
    cos = torch.nn.functional.normalize(res.B, dim=1) @ torch.nn.functional.normalize(B0, dim=1).T
    assert sorted(cos.argmax(1).tolist()) == [0, 1, 2, 3]
    assert float(cos.max(1).values.min()) > 0.999


def test_stopping_rule_is_relative_change_over_initial_error():
    A = noisy_low_rank(n=300, D=24, seed=5)
    tol = 1e-3
    res = nmf(A, 3, max_iter=500, tol=tol)
    h = res.history[: int(res.n_iter) + 1]
    drop = (h[:-1] - h[1:]) / h[0]
    assert 1 < int(res.n_iter) < 500
    assert drop[-1] < tol, "stopped on the rule"
    assert (drop[:-1] >= tol).all(), "did not stop earlier than the rule says"
    assert torch.isnan(res.history[int(res.n_iter) + 1 :]).all()
    assert int(nmf(A, 3, max_iter=37, tol=0).n_iter) == 37


def test_scaled_init_runs_longer_than_an_unscaled_one():
    """The reason for the sqrt(mean(A)/p) scale: a huge initial error stops the rule too early."""
    A = noisy_low_rank(n=400, D=64, seed=7) * 0.05  # features of small magnitude, like a CNN's
    scaled = nmf(A, 3)
    g = torch.Generator().manual_seed(0)
    E0 = torch.randn(400, 3, generator=g, dtype=A.dtype).abs()
    B0 = torch.randn(3, 64, generator=g, dtype=A.dtype).abs()
    unscaled = nmf(A, 3, init=(E0, B0))
    assert float(unscaled.init_error) > 100 * float(scaled.init_error)
    assert int(unscaled.n_iter) < int(scaled.n_iter)
    assert float(scaled.relative_error) < float(unscaled.relative_error)


def test_batched_equals_one_class_at_a_time_with_padding():
    sizes = [300, 170, 240]
    mats = [noisy_low_rank(n=m, D=20, seed=s) for s, m in enumerate(sizes)]
    A = torch.zeros(3, max(sizes), 20, dtype=torch.float64)
    for c, M in enumerate(mats):
        A[c, : len(M)] = M
    batched = nmf(A, 3, n_rows=torch.tensor(sizes), block_rows=64)
    for c, M in enumerate(mats):
        alone = nmf(M, 3)
        assert int(batched.n_iter[c]) == int(alone.n_iter)
        torch.testing.assert_close(batched.B[c], alone.B, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(batched.E[c, : len(M)], alone.E, rtol=1e-9, atol=1e-12)
        assert (batched.E[c, len(M) :] == 0).all()
        torch.testing.assert_close(batched.error[c], alone.error, rtol=1e-9, atol=0)


def test_float16_storage_keeps_float32_factors():
    A = noisy_low_rank(n=256, D=32, seed=2, dtype=torch.float32)
    half = nmf(A.half(), 3, block_rows=100)
    full = nmf(A.half().float(), 3)
    assert half.E.dtype == torch.float32 and half.B.dtype == torch.float32
    assert int(half.n_iter) == int(full.n_iter)
    torch.testing.assert_close(half.B, full.B, rtol=1e-4, atol=1e-6)


def test_negative_features_are_taken_as_zero():
    A = noisy_low_rank(n=200, D=16, seed=4) - 0.3
    torch.testing.assert_close(nmf(A, 2).B, nmf(A.clamp_min(0), 2).B)


@pytest.mark.parametrize(
    "A, p, kwargs, message",
    [
        (torch.rand(10, 8), -1, {}, "p (number of prototypes) must be >= 1, got -1"),
        (torch.rand(10, 8), 0, {}, "p (number of prototypes) must be >= 1, got 0"),
        (torch.rand(10, 8), 9, {}, "p (number of prototypes) = 9 exceeds the feature dimension D = 8"),
        (torch.rand(0, 8), 2, {}, "A has no rows"),
        (torch.rand(2, 10, 8), 2, {"n_rows": torch.tensor([10, 0])}, "class(es) at batch index [1] have no feature rows"),
        (torch.rand(10, 8).index_put_((torch.tensor([3]), torch.tensor([2])), torch.tensor(float("nan"))), 2, {}, "A contains NaN or Inf"),
        (torch.rand(10, 8).index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))), 2, {}, "A contains NaN or Inf"),
        (torch.rand(10), 2, {}, "A must have shape (n, D) or (C, n, D)"),
    ],
)
def test_bad_input_is_a_clear_value_error(A, p, kwargs, message):
    with pytest.raises(ValueError) as err:
        nmf(A, p, **kwargs)
    assert message in str(err.value)
