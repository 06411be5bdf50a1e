"""Deletion / insertion in concept space, and the TCAV-style ranking, against hand computations."""

import itertools

import pytest
import torch

from protonmf.craft.fidelity import concept_fidelity, tcav_ranking


def _problem(seed=0, N=30, r=4, D=6):
    g = torch.Generator().manual_seed(seed)
    U = torch.rand(N, r, generator=g, dtype=torch.float64) * torch.tensor([3.0, 0.2, 1.0, 0.6], dtype=torch.float64)[:r]
    W = torch.rand(r, D, generator=g, dtype=torch.float64)
    V = torch.randn(3, D, generator=g, dtype=torch.float64)
    return U, W, V


def test_curves_equal_a_hand_computation_and_the_true_order_is_optimal():
    U, W, V = _problem()
    head = lambda a: a @ V.T + 1.0  # noqa: E731
    c, r = 2, 4
    order = torch.tensor([2, 0, 3, 1])
    f = concept_fidelity(U, W, head, c, order)
    full, none = float(head(U @ W)[:, c].mean()), 1.0
    for k in range(r + 1):
        keep = torch.ones(r, dtype=torch.float64)
        keep[order[:k]] = 0
        y = float(head((U * keep) @ W)[:, c].mean())
        assert float(f["deletion"][k]) == pytest.approx((y - none) / (full - none), rel=1e-10)
    assert float(f["deletion"][0]) == pytest.approx(1) and float(f["insertion"][0]) == pytest.approx(0)
    assert float(f["deletion"][-1]) == pytest.approx(0) and float(f["insertion"][-1]) == pytest.approx(1)
    # with a linear head a concept's share of the logit is mean_n U_ni (W_i · V_c): the order by it
    # has the lowest deletion area of all r! orders
    share = (U.mean(0) * (W @ V[c])) / (full - none)
    best = share.argsort(descending=True)
    aucs = {p: concept_fidelity(U, W, head, c, torch.tensor(p))["deletion_auc"] for p in itertools.permutations(range(r))}
    assert concept_fidelity(U, W, head, c, best)["deletion_auc"] == pytest.approx(min(aucs.values()))


def test_tcav_derivatives_of_a_linear_head_are_w_dot_v():
    U, W, V = _problem(1)
    order, score = tcav_ranking(U, W, lambda a: a @ V.T, 0)
    s = W @ V[0]  # ∂(U W V_0ᵀ)/∂U_i, the same for every image
    assert torch.equal(score, (s > 0).float())
    positive = [i for i in s.argsort(descending=True).tolist() if s[i] > 0]
    assert order.tolist()[: len(positive)] == positive


def test_bad_inputs():
    U, W, V = _problem()
    with pytest.raises(ValueError, match="order must be a permutation of the 4 concepts"):
        concept_fidelity(U, W, lambda a: a @ V.T, 0, torch.tensor([0, 1, 1, 2]))
    with pytest.raises(ValueError, match=r"U and W must have shapes \(N, r\) and \(r, D\)"):
        tcav_ranking(U[:, :3], W, lambda a: a @ V.T, 0)
