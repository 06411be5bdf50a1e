"""Exactness whatever B is: the head rebuilt from prototypes found by any option of the study
(benchmarks/prototype_parts.py) gives the black box's head, so its logits, to float64 rounding."""

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import NMF

from protonmf.nmf import nmf
from protonmf.prototypes.fit import fit_prototypes, head_from_prototypes, stack_classes

K, D, p = 3, 12, 4
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # B is used as it stands


def _features():
    gen = torch.Generator().manual_seed(0)
    feats = [(torch.rand(30 + 10 * k, 6, generator=gen) @ torch.rand(6, D, generator=gen) - 0.4).relu() for k in range(K)]
    return stack_classes(feats), torch.randn(K, D, generator=gen), torch.randn(K, generator=gen)


def _bases(A, n_rows, option):
    rows = [A[k, : int(n_rows[k])].double().numpy() for k in range(K)]
    if option == "paper MU":
        return nmf(A, p, n_rows=n_rows, seed=0).B
    if option == "HALS/CD, NNDSVDa":
        return torch.stack([torch.from_numpy(NMF(p, solver="cd", init="nndsvda", max_iter=300).fit(X).components_) for X in rows])
    if option == "L1 on E":
        return torch.stack([torch.from_numpy(NMF(p, solver="cd", init="nndsvda", alpha_W=0.1, l1_ratio=1.0,
                                                 max_iter=300).fit(X).components_) for X in rows])
    if option == "k-means":
        return torch.stack([torch.from_numpy(np.maximum(KMeans(p, n_init=2, random_state=0).fit(X).cluster_centers_, 0))
                            for X in rows])
    return torch.rand(K, p, D, generator=torch.Generator().manual_seed(1))  # any non-negative B at all


@pytest.mark.parametrize("residual", ["equal", "distributed"])
@pytest.mark.parametrize("option", ["paper MU", "HALS/CD, NNDSVDa", "L1 on E", "k-means", "random"])
def test_the_head_is_the_black_boxs_for_every_way_of_finding_B(option, residual):
    (A, n_rows), V, bias = _features()
    B = _bases(A, n_rows, option).float()
    fit = head_from_prototypes(A, V, bias, B, n_rows=n_rows, residual=residual)
    head = (fit.C.unsqueeze(1) @ fit.B_aug).squeeze(1) + (~fit.spread).unsqueeze(1) * fit.R  # eq. 7–8
    torch.testing.assert_close(head, V.double(), rtol=1e-10, atol=1e-10)
    F = torch.rand(5, 4, 4, D, dtype=torch.float64)
    logits = F.mean((1, 2)) @ head.T + fit.bias
    black_box = F.mean((1, 2)) @ V.double().T + bias.double()
    assert float((logits - black_box).abs().max() / black_box.abs().max()) < 1e-10
    assert torch.equal(fit.B, B) and (fit.feature_error >= 0).all() and (fit.feature_error <= 1).all()


def test_it_is_the_fits_own_head_for_the_fits_own_B():
    (A, n_rows), V, bias = _features()
    fit, res = fit_prototypes(A, V, bias, p, n_rows=n_rows)
    again = head_from_prototypes(A, V, bias, res.B, n_rows=n_rows)
    for name in ("C", "R", "B_aug", "spread", "head_error", "n_rows"):
        torch.testing.assert_close(getattr(again, name), getattr(fit, name))
    # its feature error is that of the exact codes: no larger than the NMF's own E gives
    assert (again.feature_error <= fit.feature_error + 1e-6).all()


def test_bad_bases_are_named():
    (A, n_rows), V, bias = _features()
    with pytest.raises(ValueError, match="B must be non-negative with shape"):
        head_from_prototypes(A, V, bias, -torch.ones(K, p, D), n_rows=n_rows)
    with pytest.raises(ValueError, match="B must be non-negative with shape"):
        head_from_prototypes(A, V, bias, torch.ones(K, p, D + 1), n_rows=n_rows)
