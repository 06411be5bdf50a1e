"""Head reconstruction (ProtoNMF eq. 4–6, 8): two solvers agree, the residual is what the prototypes miss."""

import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls

from protonmf.head import (
    augment_prototypes,
    reconstruct_head,
    residual_heatmap,
    solve_coefficients_closed_form,
    solve_coefficients_cvxpy,
)


def problem(K=20, p=3, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.rand(K, p, D, generator=g, dtype=torch.float64) * (torch.rand(K, p, D, generator=g, dtype=torch.float64) < 0.5)
    V = 0.05 * torch.randn(K, D, generator=g, dtype=torch.float64)
    return V, B


@pytest.mark.parametrize("p", [1, 3, 5, 10])
def test_cvxpy_and_closed_form_agree(p):
    V, B = problem(p=p, seed=p)
    closed = solve_coefficients_closed_form(V, B)
    cvx = solve_coefficients_cvxpy(V, B)
    rel = (closed - cvx).norm(dim=1) / closed.norm(dim=1)
    assert float(rel.max()) < 1e-8
    # and both agree with numpy's least squares, class by class
    for k in range(3):
        ref = np.linalg.lstsq(B[k].T.numpy(), V[k].numpy(), rcond=None)[0]
        np.testing.assert_allclose(closed[k].numpy(), ref, rtol=1e-10, atol=1e-14)


def test_residual_is_orthogonal_to_the_prototype_span():
    V, B = problem(K=30, p=5)
    fit = reconstruct_head(V, B)
    inner = (B @ fit.R.unsqueeze(2)).squeeze(2)  # (K, p): <b_i, R>
    assert float(inner.abs().max()) < 1e-12 * float(B.norm(dim=2).max() * fit.R.norm(dim=1).max())
    torch.testing.assert_close((fit.C.unsqueeze(1) @ B).squeeze(1) + fit.R, V, rtol=0, atol=1e-15)
    torch.testing.assert_close(fit.relative_error, fit.R.square().sum(1) / V.square().sum(1))
    assert (fit.relative_error < 1).all() and (fit.relative_error > 0).all()


def test_nonneg_coefficients_match_scipy_nnls():
    V, B = problem(K=8, p=4, seed=3)
    fit = reconstruct_head(V, B, nonneg=True)
    assert (fit.C >= -1e-12).all()
    for k in range(8):
        ref, _ = scipy_nnls(B[k].T.numpy(), V[k].numpy())
        np.testing.assert_allclose(fit.C[k].numpy(), ref, atol=1e-7)
    free = reconstruct_head(V, B)
    assert (fit.relative_error >= free.relative_error - 1e-12).all()


def test_residual_heatmap_is_the_least_squares_coefficient_of_each_row():
    g = torch.Generator().manual_seed(1)
    A = torch.rand(2, 50, 16, generator=g)
    E = torch.rand(2, 50, 3, generator=g)
    B = torch.rand(2, 3, 16, generator=g)
    R = torch.randn(2, 16, generator=g)
    H = residual_heatmap(A, E, B, R)
    for k in range(2):
        target = (A[k] - E[k] @ B[k]).numpy()  # each row: min_h ||target_row - h R||
        ref = np.linalg.lstsq(R[k].numpy()[:, None], target.T, rcond=None)[0][0]
        np.testing.assert_allclose(H[k].numpy(), ref, rtol=1e-4, atol=1e-5)
    assert (residual_heatmap(A, E, B, torch.zeros(2, 16)) == 0).all()


def test_residual_heatmap_computes_in_float64_for_float64_features():
    """The model's explain calls it on float64 features: it must not round them to float32."""
    g = torch.Generator().manual_seed(2)
    A = torch.randn(3, 40, 16, generator=g, dtype=torch.float64)  # negatives: taken as 0
    E = torch.rand(3, 40, 2, generator=g, dtype=torch.float64)
    B = torch.rand(3, 2, 16, generator=g, dtype=torch.float64)
    R = 1e-20 * torch.randn(3, 16, generator=g, dtype=torch.float64)  # ||R||² ≈ 1e-39: no floor bends it
    H = residual_heatmap(A, E, B, R)
    assert H.dtype == torch.float64
    for k in range(3):
        target = (A[k].clamp_min(0) - E[k] @ B[k]).numpy()
        ref = np.linalg.lstsq(R[k].numpy()[:, None], target.T, rcond=None)[0][0]
        np.testing.assert_allclose(H[k].numpy(), ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())


def test_augmented_prototypes_rebuild_the_head_exactly():
    V, B = problem(K=12, p=3, seed=4)
    fit = reconstruct_head(V, B)
    B_aug, spread = augment_prototypes(B, fit.C, fit.R)
    assert spread.all()
    torch.testing.assert_close((fit.C.unsqueeze(1) @ B_aug).squeeze(1), V, rtol=1e-12, atol=1e-14)  # eq. 8


def test_residual_is_not_spread_where_coefficients_sum_to_zero():
    B = torch.rand(2, 2, 8, dtype=torch.float64)
    C = torch.tensor([[1.0, -1.0], [0.5, 0.25]], dtype=torch.float64)
    R = torch.randn(2, 8, dtype=torch.float64)
    B_aug, spread = augment_prototypes(B, C, R)
    assert spread.tolist() == [False, True]
    torch.testing.assert_close(B_aug[0], B[0])


@pytest.mark.parametrize(
    "V, B, message",
    [
        (torch.rand(3, 10), torch.rand(3, 2, 12), "feature dimension mismatch: head V has D = 10 but prototypes B have D = 12"),
        (torch.rand(3, 10), torch.rand(4, 2, 10), "V has 3 classes but B has 4"),
        (torch.full((3, 10), float("nan")), torch.rand(3, 2, 10), "V contains NaN or Inf"),
        (torch.rand(10), torch.rand(3, 2, 10), "V (head weights) must have shape (K, D)"),
    ],
)
def test_bad_input_is_a_clear_value_error(V, B, message):
    with pytest.raises(ValueError) as err:
        reconstruct_head(V, B)
    assert message in str(err.value)
