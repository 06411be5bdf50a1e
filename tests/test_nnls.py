"""Batched NNLS (ProtoNMF eq. 9) against scipy's active-set solver."""

import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls

from protonmf.nnls import nnls


def reference(X, B):
    return np.stack([scipy_nnls(B.numpy().T, x)[0] for x in X.numpy()])


@pytest.mark.parametrize("p", [1, 3, 6, 10])
@pytest.mark.parametrize("method", ["enumerate", "pgd"])
def test_matches_scipy_with_negative_basis_entries(p, method):
    g = torch.Generator().manual_seed(p)
    B = torch.randn(p, 40, generator=g, dtype=torch.float64) + 0.3  # augmented prototypes can be negative
    X = torch.randn(120, 40, generator=g, dtype=torch.float64) + 0.2
    E = nnls(X, B, method=method, max_iter=20000, tol=1e-12)
    assert (E >= 0).all()
    np.testing.assert_allclose(E.numpy(), reference(X, B), atol=1e-6 if method == "pgd" else 1e-10)


def test_batched_bases_broadcast_over_leading_axes():
    g = torch.Generator().manual_seed(0)
    B = torch.rand(4, 3, 20, generator=g, dtype=torch.float64)
    X = torch.rand(4, 30, 20, generator=g, dtype=torch.float64)
    E = nnls(X, B)
    for k in range(4):
        np.testing.assert_allclose(E[k].numpy(), reference(X[k], B[k]), atol=1e-10)


def test_bad_input():
    with pytest.raises(ValueError, match="feature dimension mismatch: X has D = 5, B has D = 6"):
        nnls(torch.rand(3, 5), torch.rand(2, 6))
    with pytest.raises(ValueError, match="p = 11 > 10"):
        nnls(torch.rand(3, 12), torch.rand(11, 12), method="enumerate")


@pytest.mark.parametrize("start", ["nmf", "far"])
def test_coordinate_descent_from_a_start_gives_the_exact_codes(start):
    # "cd" reads each row's active set off a few sweeps from the start and solves it; rows whose
    # set is not settled (a far start) are solved by "enumerate": scipy's answer either way.
    from protonmf import nnls as module
    from protonmf.nmf import nmf

    gen = torch.Generator().manual_seed(0)
    X = (torch.rand(3, 400, 24, generator=gen, dtype=torch.float64) @ torch.rand(3, 24, 32, generator=gen, dtype=torch.float64) - 5).relu()
    res = nmf(X, 6, seed=0)
    B = res.B.double()
    init = res.E.double() if start == "nmf" else torch.full_like(res.E, 50.0, dtype=torch.float64)
    calls = []
    real = module._enumerate
    module._enumerate = lambda h, G, rows: calls.append(h.shape[-2]) or real(h, G, rows)
    try:
        E = nnls(X, B, method="cd", init=init)
    finally:
        module._enumerate = real
    ref = np.stack([np.stack([scipy_nnls(B[k].numpy().T, x)[0] for x in X[k].numpy()]) for k in range(3)])
    np.testing.assert_allclose(E.numpy(), ref, atol=1e-9)
    assert (sum(calls) < 0.05 * 3 * 400) if start == "nmf" else sum(calls) > 0  # the fallback, only where needed
    with pytest.raises(ValueError, match="init must have shape"):
        nnls(X, B, method="cd", init=init[:, :10])
