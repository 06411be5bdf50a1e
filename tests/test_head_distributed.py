"""The residual split over the prototypes (Tan et al., ICML 2024): exact head, and the closed form
equals a generic solver of the same constrained least squares."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from protonmf.head import absorb_residual_pieces, distribute_residual, reconstruct_head


def problem(K=4, n=40, p=3, D=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(K, n, D, generator=g, dtype=torch.float64) * (torch.rand(K, n, D, generator=g, dtype=torch.float64) < 0.6)
    B = torch.rand(K, p, D, generator=g, dtype=torch.float64)
    V = 0.1 * torch.randn(K, D, generator=g, dtype=torch.float64)
    return A, B, V


def objective(F, b, r, lam):
    """Σ_i ||λ_i F b_iᵀ − F r_iᵀ||² / s_i², s_i = ||F b_iᵀ||, for one class (numpy)."""
    s2 = ((F @ b.T) ** 2).sum(0)
    return sum(((lam[i] * F @ b[i] - F @ r[i]) ** 2).sum() / s2[i] for i in range(len(b)))


def kkt_reference(F, b, R):
    """Solve the KKT system of min Σ_i ||λ_i F b_i − F r_i||²/s_i² s.t. Σ r_i = R with numpy's lstsq."""
    p, D = b.shape
    n = F.shape[0]
    s = np.sqrt(((F @ b.T) ** 2).sum(0))
    H = np.zeros((p * n, p * D + p))  # rows: the maps of each prototype; x = (r_1..r_p, λ)
    for i in range(p):
        H[i * n : (i + 1) * n, i * D : (i + 1) * D] = -F / s[i]
        H[i * n : (i + 1) * n, p * D + i] = F @ b[i] / s[i]
    E = np.zeros((D, p * D + p))
    for i in range(p):
        E[:, i * D : (i + 1) * D] = np.eye(D)
    kkt = np.block([[2 * H.T @ H, E.T], [E, np.zeros((D, D))]])
    rhs = np.concatenate([np.zeros(p * D + p), R])
    x = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    return x[: p * D].reshape(p, D), x[p * D : p * D + p]


@pytest.mark.parametrize("p", [1, 2, 4])
def test_closed_form_equals_the_kkt_system_solved_by_lstsq(p):
    A, B, V = problem(K=3, n=40, p=p, D=10, seed=p)  # 40 positions > 10 channels: G invertible, one solution
    R = reconstruct_head(V, B).R
    pieces = distribute_residual(A, B, R, block_rows=7)  # blocks that do not divide n
    for k in range(3):
        ref, _ = kkt_reference(A[k].numpy(), B[k].numpy(), R[k].numpy())
        np.testing.assert_allclose(pieces[k].numpy(), ref, rtol=1e-7, atol=1e-10)


def test_closed_form_reaches_the_minimum_of_scipy_when_the_gram_matrix_is_singular():
    A, B, V = problem(K=2, n=5, p=3, D=10, seed=7)  # 5 positions < 10 channels: many minimisers
    R = reconstruct_head(V, B).R
    pieces = distribute_residual(A, B, R)
    for k in range(2):
        F, b, Rk = A[k].numpy(), B[k].numpy(), R[k].numpy()
        p, D = b.shape
        lam = np.linalg.lstsq(F @ b.T, F @ Rk, rcond=None)[0]
        ours = objective(F, b, pieces[k].numpy(), lam)

        def f(x):
            r = np.vstack([x[: (p - 1) * D].reshape(p - 1, D), Rk - x[: (p - 1) * D].reshape(p - 1, D).sum(0)])
            return objective(F, b, r, x[(p - 1) * D :])

        best = minimize(f, np.zeros((p - 1) * D + p), method="BFGS", options={"gtol": 1e-12, "maxiter": 10000})
        assert ours <= best.fun + 1e-9
        assert best.fun <= ours + 1e-9  # the same minimum, reached by a generic solver
        np.testing.assert_allclose(pieces[k].numpy().sum(0), Rk, rtol=0, atol=1e-15)


def test_a_residual_in_the_prototypes_span_goes_to_the_prototypes_that_shape_it():
    A, B, _ = problem(K=1, n=30, p=3, D=8, seed=2)
    R = (0.3 * B[:, 0] - 0.2 * B[:, 1])  # its map is 0.3·map_0 − 0.2·map_1 exactly
    pieces = distribute_residual(A, B, R)
    torch.testing.assert_close(pieces[0], torch.stack([0.3 * B[0, 0], -0.2 * B[0, 1], torch.zeros(8, dtype=torch.float64)]),
                               rtol=1e-9, atol=1e-12)


def test_what_no_prototype_map_explains_is_split_in_proportion_to_their_squared_map_norms():
    # two positions; prototype 0 lights position 0 with 3, prototype 1 with 1; the residual lives on a
    # channel no position has, so its map is 0, λ = 0 and r_i = s_i² / Σ s_j² · R = (9/10, 1/10) R.
    A = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    B = torch.tensor([[[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    R = torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float64)
    pieces = distribute_residual(A, B, R)
    torch.testing.assert_close(pieces[0], torch.tensor([[0.0, 0.0, 1.8], [0.0, 0.0, 0.2]], dtype=torch.float64))


def test_distributed_prototypes_rebuild_the_head_exactly_and_batching_changes_nothing():
    A, B, V = problem(K=6, n=50, p=3, D=16, seed=3)
    fit = reconstruct_head(V, B)
    pieces = distribute_residual(A, B, fit.R)
    torch.testing.assert_close(pieces.sum(1), fit.R, rtol=0, atol=1e-15)  # Σ r_i = R
    B_aug, spread = absorb_residual_pieces(B, fit.C, pieces)
    assert spread.all()
    torch.testing.assert_close(fit.C.unsqueeze(2) * B_aug, fit.C.unsqueeze(2) * B + pieces, rtol=1e-12, atol=1e-15)  # p̃_i
    torch.testing.assert_close((fit.C.unsqueeze(1) @ B_aug).squeeze(1), V, rtol=1e-12, atol=1e-14)
    one = torch.cat([distribute_residual(A[k : k + 1], B[k : k + 1], fit.R[k : k + 1]) for k in range(6)])
    torch.testing.assert_close(one, pieces, rtol=1e-10, atol=1e-14)


def test_float16_features_still_give_pieces_that_sum_to_the_residual():
    A, B, V = problem(K=2, n=50, p=3, D=16, seed=5)
    R = reconstruct_head(V, B).R
    torch.testing.assert_close(distribute_residual(A.half(), B.float(), R).sum(1), R, rtol=0, atol=1e-15)


def test_a_zero_coefficient_keeps_the_residual_explicit():
    B = torch.rand(2, 2, 5, dtype=torch.float64)
    C = torch.tensor([[1.0, 0.0], [0.5, -0.25]], dtype=torch.float64)
    pieces = torch.randn(2, 2, 5, dtype=torch.float64)
    B_aug, spread = absorb_residual_pieces(B, C, pieces)
    assert spread.tolist() == [False, True]
    torch.testing.assert_close(B_aug[0], B[0], rtol=0, atol=0)
    torch.testing.assert_close(B_aug[1], B[1] + pieces[1] / C[1].unsqueeze(1), rtol=0, atol=0)


def test_mismatched_shapes_are_a_clear_value_error():
    with pytest.raises(ValueError, match=r"A \(2, 5, 4\), B \(2, 3, 6\) and R \(2, 6\) disagree on K or D"):
        distribute_residual(torch.rand(2, 5, 4), torch.rand(2, 3, 6), torch.rand(2, 6))
