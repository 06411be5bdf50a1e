"""Deletion / insertion in concept space, and the TCAV-style ranking, against hand computations
and finite differences."""

import itertools

import pytest
import torch

from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.backbones.layer_cut import LayerCut
from protonmf.backbones.nets import SmallCNN
from protonmf.craft.concepts import encode_positions, unit_concepts
from protonmf.craft.fidelity import concept_fidelity, directional_derivatives, tcav_ranking
from protonmf.sobol import concept_importance


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


def test_tcav_derivatives_of_a_linear_head_are_w_dot_v_for_every_image():
    U, W, V = _problem(1)
    s = directional_derivatives(U, W, lambda a: a @ V.T, 0)
    torch.testing.assert_close(s, (W @ V[0]).expand_as(s), rtol=1e-12, atol=0)  # ∂(U W V_0ᵀ)/∂U_i: no image differs
    order, score, mean = tcav_ranking(U, W, lambda a: a @ V.T, 0)
    assert torch.equal(score, (W @ V[0] > 0).double())  # so the TCAV score is 0 or 1
    assert order.tolist() == (W @ V[0]).argsort(descending=True).tolist()


def test_tcav_ranks_by_score_first_then_by_mean_derivative():
    # derivatives of 4 images, as a head linear in U gives them: s_n,i = U-independent column c_i,
    # here made image-dependent by a head h(a) = Σ_d a_d · G_n,d read off per image
    s = torch.tensor([[1.0, -5.0, 0.1, 2.0], [1.0, 9.0, 0.1, -1.0], [1.0, 9.0, -0.1, -1.0], [-3.0, 9.0, 0.1, -1.0]],
                     dtype=torch.float64)
    W = torch.eye(4, dtype=torch.float64)
    head = lambda a: (a * s).sum(1, keepdim=True)  # noqa: E731  ∂h/∂U_n,i = s_n,i
    order, score, mean = tcav_ranking(torch.ones(4, 4, dtype=torch.float64), W, head, 0)
    assert score.tolist() == [0.75, 0.75, 0.75, 0.25] and mean.tolist() == pytest.approx([0.0, 5.5, 0.05, -0.25])
    # scores tie for 0, 1, 2: their means decide (5.5, 0.05, 0.0); concept 3 scores least
    assert order.tolist() == [1, 2, 0, 3]


@pytest.fixture(scope="module")
def cut():
    torch.manual_seed(0)
    return LayerCut(FeatureBackbone.from_model(SmallCNN(num_classes=3, width=8).double()), "layer2", 64)


def test_directional_derivatives_are_finite_differences_through_the_rest_of_the_network(cut):
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        F = cut.activations(x).clamp_min(0)  # (4, 16, 16, 16)
    W, _ = unit_concepts(torch.rand(3, F.shape[-1], generator=torch.Generator().manual_seed(3), dtype=torch.float64),
                         torch.zeros(0, 3, dtype=torch.float64))
    U = encode_positions(F, W)  # (4, 16, 16, 3)
    c, eps = 1, 1e-6
    s = directional_derivatives(U, W, cut.logits, c)
    A = U @ W
    with torch.no_grad():
        for i in range(3):  # the concept added at every position of the layer
            fd = (cut.logits(A + eps * W[i])[:, c] - cut.logits(A - eps * W[i])[:, c]) / (2 * eps)
            torch.testing.assert_close(s[:, i], fd, rtol=1e-6, atol=1e-8)
    # the rest of the network is not linear: the derivative changes from image to image (measured
    # spread 2–8% of the mean on this random network; a linear head gives exactly 0)
    assert (s.std(0) > 0.01 * s.abs().mean(0)).all()


def test_gradients_miss_a_saturated_concept_that_sobol_sees():
    # h(a) = a_0 + 10·min(a_1, 1) with U_1 ∈ [2, 3]: concept 1 carries ~95% of the logit but the
    # logit is flat in it at every image (derivative 0), while concept 0 has derivative 1.
    g = torch.Generator().manual_seed(4)
    U = torch.stack([torch.rand(50, generator=g, dtype=torch.float64), 2 + torch.rand(50, generator=g, dtype=torch.float64)], 1)
    W = torch.eye(2, dtype=torch.float64)
    head = lambda a: (a[..., 0] + 10 * a[..., 1].clamp_max(1)).unsqueeze(-1)  # noqa: E731
    order, score, _ = tcav_ranking(U, W, head, 0)
    assert score.tolist() == [1.0, 0.0] and order.tolist() == [0, 1]
    sobol = concept_importance(U, W, head, 0, n_design=64, seed=0)
    assert sobol.argsort(descending=True).tolist() == [1, 0]
    m = float(U[:, 0].mean())  # deletion removes concept 1 first (Sobol) or concept 0 first (TCAV)
    expected = {(1, 0): 0.25 + 0.5 * m / (m + 10), (0, 1): 0.25 + 0.5 * 10 / (m + 10)}  # trapezoids at k/r = 0, ½, 1
    for o, auc in expected.items():
        f = concept_fidelity(U, W, head, 0, torch.tensor(o))
        assert f["deletion_auc"] == pytest.approx(auc, rel=1e-12) and f["insertion_auc"] == pytest.approx(1 - auc, rel=1e-12)


def test_bad_inputs():
    U, W, V = _problem()
    with pytest.raises(ValueError, match="order must be a permutation of the 4 concepts"):
        concept_fidelity(U, W, lambda a: a @ V.T, 0, torch.tensor([0, 1, 1, 2]))
    with pytest.raises(ValueError, match=r"U and W must have shapes \(N, ..., r\) and \(r, D\)"):
        tcav_ranking(U[:, :3], W, lambda a: a @ V.T, 0)
