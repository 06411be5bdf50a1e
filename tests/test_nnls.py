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
