"""A class without a usable image: no prototypes, the head kept whole by the residual (exact logits)."""

import torch

from protonmf.prototypes.fit import fit_classes, fit_prototypes_sweep, stack_classes
from protonmf.prototypes.model import PrototypeModel


def test_a_class_without_rows_keeps_its_head_through_the_residual(resnet):
    g = torch.Generator().manual_seed(0)
    K, D = resnet.num_classes, resnet.V.shape[1]
    features = [torch.rand(6, 2, 2, D, generator=g) for _ in range(K)]
    features[1] = features[1][:0]  # every image of class 1 was unreadable
    features[3] = features[3][:0]
    fits = fit_classes(features, resnet.V, resnet.bias, [3, 1], max_iter=50, seed=0)

    for p, fit in fits.items():
        assert fit.n_rows.tolist() == [24, 0, 24, 0, 24]
        for k in (1, 3):
            assert torch.equal(fit.B[k], torch.zeros(p, D)) and torch.equal(fit.C[k], torch.zeros(p, dtype=torch.float64))
            assert torch.equal(fit.R[k], resnet.V[k].double()) and not fit.spread[k]
            assert fit.head_error[k] == 1.0 and fit.feature_error[k] == 0.0 and fit.n_iter[k] == 0
        # the classes with images are fitted exactly as without the empty ones
        A, n_rows = stack_classes([features[k] for k in (0, 2, 4)])
        alone, _ = fit_prototypes_sweep(A, resnet.V[[0, 2, 4]], resnet.bias[[0, 2, 4]], [3, 1], n_rows=n_rows,
                                        max_iter=50, seed=0)[p]
        for name in ("B", "C", "R", "B_aug", "n_iter"):
            assert torch.equal(getattr(fit, name)[[0, 2, 4]], getattr(alone, name)), name

    model = PrototypeModel.from_prototypes(resnet, [fits[3], fits[1]], [f"c{k}" for k in range(K)])
    F = torch.randn(8, 2, 2, D, generator=g)
    black_box = F.flatten(1, 2).mean(1) @ resnet.V.T + resnet.bias  # mean_hw(F)·Vᵀ + bias
    for m in (model, model.with_p(1)):
        assert float((m.logits_from_features(F) - black_box).abs().max()) <= 1e-5 * float(black_box.abs().max())
    # residual only (eq. 7): the empty classes' logits are the black box's even without prototypes
    nmf_only = model.with_mode("nmf_only").logits_from_features(F)
    assert torch.equal(nmf_only[:, [1, 3]], resnet.bias[[1, 3]].expand(8, 2).to(nmf_only.dtype))

