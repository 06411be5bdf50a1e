"""Implicit differentiation of the batched NNLS (CRAFT §3.4) against central finite differences."""

import pytest
import torch

from protonmf.nnls import nnls, nnls_differentiable

EPS = 1e-6
MARGIN = 1e-3  # distance to the kink: min E on the active set, min multiplier off it


def _margins(X, B):
    """(min E_j over active coordinates, min (Ge − h)_j over inactive ones, #active, #inactive)."""
    E = nnls(X, B)
    multiplier = E @ (B @ B.T) - X @ B.T  # ≥ 0 off the active set (KKT)
    active = E > 0
    return E[active].min(), multiplier[~active].min(), int(active.sum()), int((~active).sum())


def problem(seed, n=5, p=4, D=6):
    """A float64 problem whose active sets mix active and inactive coordinates, none at a kink.

    Seeds are tried in a fixed order from ``seed``, so the problem returned is always the same.
    """
    for s in range(seed, seed + 50):
        g = torch.Generator().manual_seed(s)
        B = torch.randn(p, D, generator=g, dtype=torch.float64) + 0.3  # negative entries, as eq. 8's
        X = torch.randn(n, D, generator=g, dtype=torch.float64) + 0.2
        e_min, mult_min, n_active, n_inactive = _margins(X, B)
        if n_active >= n and n_inactive >= n and e_min > MARGIN and mult_min > MARGIN:
            return X, B
    raise AssertionError(f"no non-degenerate problem among seeds {seed}..{seed + 49}")


def finite_difference_jacobian(f, Z):
    """dE/dZ by central differences, shape (*E.shape, *Z.shape)."""
    columns = []
    for k in range(Z.numel()):
        dZ = torch.zeros_like(Z).view(-1)
        dZ[k] = EPS
        dZ = dZ.view_as(Z)
        columns.append((f(Z + dZ) - f(Z - dZ)) / (2 * EPS))
    return torch.stack(columns, -1).reshape(*columns[0].shape, *Z.shape)


def autograd_jacobian(f, Z):
    Z = Z.clone().requires_grad_(True)
    E = f(Z)
    rows = [torch.autograd.grad(E.view(-1)[k], Z, retain_graph=True)[0] for k in range(E.numel())]
    return torch.stack(rows).reshape(*E.shape, *Z.shape)


def test_forward_is_nnls():
    X, B = problem(0)
    torch.testing.assert_close(nnls_differentiable(X, B), nnls(X, B), rtol=0, atol=0)
    torch.testing.assert_close(
        nnls_differentiable(X, B, method="pgd", tol=1e-12), nnls(X, B, method="pgd", tol=1e-12), rtol=0, atol=0
    )


@pytest.mark.parametrize("seed", [0, 100])
def test_jacobians_match_central_differences(seed):
    X, B = problem(seed)
    for wrt, f, Z in [
        ("X", lambda Z: nnls_differentiable(Z, B), X),
        ("B", lambda Z: nnls_differentiable(X, Z), B),
    ]:
        J_fd = finite_difference_jacobian(f, Z)
        J = autograd_jacobian(f, Z)
        assert J.abs().max() > 0.1, wrt  # not trivially zero
        torch.testing.assert_close(J, J_fd, rtol=1e-5, atol=1e-7, msg=lambda m: f"dE/d{wrt}: {m}")


def test_inactive_coordinates_have_zero_gradient():
    X, B = problem(0)
    E = nnls(X, B)
    J = autograd_jacobian(lambda Z: nnls_differentiable(Z, B), X)  # (n, p, n, D)
    assert (J[E == 0] == 0).all()
    J_B = autograd_jacobian(lambda Z: nnls_differentiable(X, Z), B)
    assert (J_B[E == 0] == 0).all()


def test_gradcheck_with_batched_and_broadcast_basis():
    Xs = torch.stack([problem(0)[0], problem(7)[0]])  # (2, n, D)
    B = problem(0)[1]  # (p, D), broadcast against both batches
    for b in range(2):
        e_min, mult_min, _, _ = _margins(Xs[b], B)
        assert e_min > MARGIN and mult_min > MARGIN
    X_leaf = Xs.clone().requires_grad_(True)
    B_leaf = B.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(nnls_differentiable, (X_leaf, B_leaf), eps=EPS, atol=1e-7, rtol=1e-5)
    # The broadcast gradient of B is the sum of the per-batch gradients.
    nnls_differentiable(X_leaf, B_leaf).square().sum().backward()
    per_batch = []
    for b in range(2):
        Bb = B.clone().requires_grad_(True)
        nnls_differentiable(Xs[b], Bb).square().sum().backward()
        per_batch.append(Bb.grad)
    torch.testing.assert_close(B_leaf.grad, per_batch[0] + per_batch[1])


def test_float32_inputs_get_float32_gradients():
    X, B = problem(0)
    X32 = X.float().requires_grad_(True)
    B64 = B.clone().requires_grad_(True)
    E = nnls_differentiable(X32, B64)
    assert E.dtype == torch.float64  # as nnls: float64 if either input is
    E.sum().backward()
    assert X32.grad.dtype == torch.float32 and B64.grad.dtype == torch.float64
    assert X32.grad.shape == X.shape and B64.grad.shape == B.shape
