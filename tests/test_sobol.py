"""Total Sobol indices (Jansen estimator) on functions with known indices, and CRAFT's concept importance."""

import math

import pytest
import torch

from protonmf.sobol import concept_importance, sobol_masks, split_sobol_outputs, total_sobol_indices


def ishigami(x, a=7.0, b=0.1):
    """Ishigami & Homma (1990) on x of shape (m, 3) in [−π, π]³."""
    return torch.sin(x[:, 0]) + a * torch.sin(x[:, 1]) ** 2 + b * x[:, 2] ** 4 * torch.sin(x[:, 0])


def ishigami_total_indices(a=7.0, b=0.1):
    """Analytic S^T: V1 = ½(1 + bπ⁴/5)², V2 = a²/8, V13 = 8b²π⁸/225, V = V1 + V2 + V13."""
    V1 = 0.5 * (1 + b * math.pi**4 / 5) ** 2
    V2 = a**2 / 8
    V13 = 8 * b**2 * math.pi**8 / 225
    V = V1 + V2 + V13
    return torch.tensor([(V1 + V13) / V, V2 / V, V13 / V], dtype=torch.float64)


def test_masks_layout():
    n, d = 8, 3
    M = sobol_masks(n, d, seed=1)
    assert M.shape == (n * (d + 2), d) and M.dtype == torch.float64
    assert ((M >= 0) & (M < 1)).all()
    A, B, AB = split_sobol_outputs(M, n, d)
    for i in range(d):
        others = [j for j in range(d) if j != i]
        torch.testing.assert_close(AB[i][:, i], B[:, i], rtol=0, atol=0)
        torch.testing.assert_close(AB[i][:, others], A[:, others], rtol=0, atol=0)
    assert not torch.equal(A, B)
    torch.testing.assert_close(sobol_masks(n, d, seed=1), M, rtol=0, atol=0)  # seeded
    assert not torch.equal(sobol_masks(n, d, seed=2), M)


def test_ishigami_analytic_total_indices():
    published = torch.tensor([0.5576, 0.4424, 0.2437], dtype=torch.float64)
    assert torch.allclose(ishigami_total_indices(), published, atol=1e-4)
    n = 2**12
    for sequence in ["sobol", "halton"]:
        x = sobol_masks(n, 3, seed=0, sequence=sequence) * 2 * math.pi - math.pi
        ST = total_sobol_indices(ishigami(x), n, 3)
        assert ST.shape == (3,)
        assert (ST - ishigami_total_indices()).abs().max() < 0.01, (sequence, ST)  # QMC error at n = 2^12: ~1e-3


def test_linear_model_total_indices():
    c = torch.tensor([3.0, -2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    n, d = 2**10, 5
    f = sobol_masks(n, d, seed=3) @ c
    ST = total_sobol_indices(f, n, d)
    expected = c**2 / (c**2).sum()  # independent inputs: no interactions, S_i^T = S_i = c_i² / Σ c_j²
    assert (ST - expected).abs().max() < 0.005, ST
    assert ST[-1] == 0  # an input the model ignores explains exactly nothing


def test_batched_over_trailing_axes_equals_per_column():
    n, d = 64, 4
    M = sobol_masks(n, d, seed=5)
    g = torch.Generator().manual_seed(0)
    coef = torch.randn(d, 3, 2, generator=g, dtype=torch.float64)
    f = torch.tanh(torch.einsum("md,dab->mab", M, coef)) + M[:, :1, None] * M[:, 1:2, None]  # (m, 3, 2)
    ST = total_sobol_indices(f, n, d)
    assert ST.shape == (d, 3, 2)
    for a in range(3):
        for b in range(2):
            torch.testing.assert_close(ST[:, a, b], total_sobol_indices(f[:, a, b], n, d))


def test_constant_output_has_zero_indices():
    n, d = 16, 3
    ST = total_sobol_indices(torch.ones(n * (d + 2), 2), n, d)
    assert torch.equal(ST, torch.zeros(d, 2))


class ReadsOneConcept(torch.nn.Module):
    """Logit k = tanh(2 ⟨a, w_{concept_k}⟩) + bias_k: class k reads concept concept_k only."""

    def __init__(self, W, concepts):
        super().__init__()
        self.readout = W[concepts].T / W[concepts].norm(dim=1) ** 2  # (D, K)

    def forward(self, a):
        return torch.tanh(2 * a @ self.readout) + torch.arange(self.readout.shape[1], dtype=a.dtype)


def orthogonal_bank(r, D, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, r, generator=g, dtype=torch.float64))
    return Q.T * torch.arange(1, r + 1, dtype=torch.float64)[:, None]  # (r, D), orthogonal rows


def test_concept_importance_of_a_head_that_reads_one_concept():
    r, D, N = 4, 7, 10
    W = orthogonal_bank(r, D, seed=0)
    U = torch.rand(N, r, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    head = ReadsOneConcept(W, concepts=[2, 0])
    for class_idx, concept in [(0, 2), (1, 0)]:
        importance = concept_importance(U, W, head, class_idx, n_design=64)
        assert importance.shape == (r,)
        expected = torch.zeros(r, dtype=torch.float64)
        expected[concept] = 1.0
        torch.testing.assert_close(importance, expected, rtol=0, atol=0.05)
        others = [i for i in range(r) if i != concept]
        assert (importance[others] < 1e-12).all()  # masks of unread concepts change nothing but rounding


def test_concept_importance_chunking_and_per_image_classes():
    r, D, N = 3, 5, 6
    W = orthogonal_bank(r, D, seed=2)
    U = torch.rand(N, r, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(D, 4, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, D, generator=g, dtype=torch.float64))

    def head(a):
        return torch.relu(lin(a)) ** 2

    classes = torch.tensor([0, 1, 2, 3, 0, 1])
    whole = concept_importance(U, W, head, classes, n_design=16, batch_size=10**6)
    chunked = concept_importance(U, W, head, classes, n_design=16, batch_size=7)  # chunks span images
    torch.testing.assert_close(chunked, whole)
    # The mean over images of the per-image indices, image by image.
    masks = sobol_masks(16, r)
    per_image = [
        total_sobol_indices(head((U[n] * masks) @ W)[:, int(classes[n])], 16, r) for n in range(N)
    ]
    torch.testing.assert_close(whole, torch.stack(per_image).mean(0))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"n_design must be an integer ≥ 2, got 1"):
        sobol_masks(1, 3)
    with pytest.raises(ValueError, match=r"d must be an integer ≥ 1, got 0"):
        sobol_masks(4, 0)
    with pytest.raises(ValueError, match=r"sequence must be 'sobol' or 'halton', got 'lhs'"):
        sobol_masks(4, 2, sequence="lhs")
    with pytest.raises(ValueError, match=r"n_design must be an integer ≥ 2, got 1"):
        total_sobol_indices(torch.zeros(5), 1, 3)
    with pytest.raises(ValueError, match=r"f_values must have n_design \* \(d \+ 2\) = 20 rows .* got shape \(19,\)"):
        total_sobol_indices(torch.zeros(19), 4, 3)
    W = torch.rand(3, 5)
    with pytest.raises(ValueError, match=r"U and W must have shapes \(N, \.\.\., r\) and \(r, D\), got \(4, 2\), \(3, 5\)"):
        concept_importance(torch.rand(4, 2), W, lambda a: a, 0)
    with pytest.raises(ValueError, match=r"class_idx must be an int or have shape \(N,\) = \(4,\), got \(3,\)"):
        concept_importance(torch.rand(4, 3), W, lambda a: a, [0, 1, 2])
    with pytest.raises(ValueError, match=r"head must map activations \(m, \.\.\., D\) to logits \(m, K\)"):
        concept_importance(torch.rand(4, 3), W, lambda a: a.sum(-1), 0, n_design=4)


def test_spatial_coefficients_through_a_pooling_head_equal_pooled_ones():
    """A mask scales a concept at every position alike, so with a head that averages positions
    (linear) the spatial estimate equals the pooled one; a non-linear head makes them differ."""
    g = torch.Generator().manual_seed(3)
    U = torch.rand(6, 4, 4, 3, generator=g, dtype=torch.float64)  # (N, h, w, r)
    W = torch.rand(3, 5, generator=g, dtype=torch.float64)
    V = torch.randn(2, 5, generator=g, dtype=torch.float64)
    pooled_head = lambda a: a.flatten(1, -2).mean(1) @ V.T  # noqa: E731
    spatial = concept_importance(U, W, pooled_head, 1, n_design=32, batch_size=50)
    pooled = concept_importance(U.flatten(1, 2).mean(1), W, lambda a: a @ V.T, 1, n_design=32)
    torch.testing.assert_close(spatial, pooled, rtol=1e-10, atol=1e-12)
    relu_head = lambda a: a.clamp_min(0.4).flatten(1, -2).mean(1) @ V.T  # noqa: E731
    assert not torch.allclose(concept_importance(U, W, relu_head, 1, n_design=32), pooled, atol=1e-3)
