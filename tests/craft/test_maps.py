"""Concept attribution maps: forward (per-position NNLS) and backward (implicit NNLS gradients)."""

import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls

from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.craft.maps import concept_maps, concept_values
from protonmf.backbones.nets import SmallCNN


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    backbone = FeatureBackbone.from_model(SmallCNN(num_classes=3, width=8))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        F = backbone(x).clamp_min(0)
    g = torch.Generator().manual_seed(2)
    W = F.flatten(0, 2)[torch.randperm(F[0].numel() // F.shape[-1], generator=g)[:3]] + 0.05 * torch.rand(3, F.shape[-1], generator=g)
    return backbone, x, F, W


def test_nnls_maps_are_per_position_nnls_upsampled(setup):
    backbone, x, F, W = setup
    maps = concept_maps(backbone, x, W, method="nnls")
    assert maps.shape == (2, 3, 64, 64) and (maps >= 0).all()
    rows = F.reshape(-1, F.shape[-1]).double().numpy()
    ref = torch.from_numpy(np.stack([scipy_nnls(W.double().numpy().T, f)[0] for f in rows]))  # every position
    ref = ref.reshape(2, 8, 8, 3).permute(0, 3, 1, 2)
    up = torch.nn.functional.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(maps.double(), up, rtol=1e-3, atol=1e-3 * float(up.max()))  # float32 solve


def test_gradcam_weights_are_the_implicit_gradient_of_the_concept_values(setup):
    backbone, x, F, W = setup
    Fd = F.double().requires_grad_(True)
    u = concept_values(Fd, W.double())
    (grad,) = torch.autograd.grad(u[0, 1], Fd)
    eps = 1e-6
    positive = (F[0] > 1e-3).nonzero()[:: max(1, int((F[0] > 1e-3).sum()) // 4)][:4]
    for idx in [(0, *map(int, p)) for p in positive]:  # central differences where F > 0 (not at the clamp)
        e = torch.zeros_like(Fd)
        e[idx] = eps
        with torch.no_grad():
            fd = (concept_values(Fd + e, W.double())[0, 1] - concept_values(Fd - e, W.double())[0, 1]) / (2 * eps)
        assert float(grad[idx]) == pytest.approx(float(fd), rel=1e-4, abs=1e-8)
    maps = concept_maps(backbone, x, W, method="gradcam")
    alpha = grad.mean((1, 2))[0]  # (D,): Grad-CAM weights of concept 1 on image 0
    cam = (F[0].double() @ alpha).clamp_min(0)  # (8, 8)
    up = torch.nn.functional.interpolate(cam[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(maps[0, 1].double(), up, rtol=1e-4, atol=1e-6 * float(up.max()) + 1e-9)


def test_saliency_maps_and_bad_inputs(setup):
    backbone, x, F, W = setup
    sal = concept_maps(backbone, x, W, method="saliency")
    assert sal.shape == (2, 3, 64, 64) and (sal >= 0).all() and sal.sum() > 0
    with pytest.raises(ValueError, match="method must be one of"):
        concept_maps(backbone, x, W, method="lime")
    with pytest.raises(ValueError, match=r"W must have shape \(r, 32\)"):
        concept_maps(backbone, x, W[:, :5])
