"""CRAFT slice: crops, concepts from predicted images, NNLS encoding, Sobol importance."""

import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls

from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.craft.concepts import (
    ClassConcepts,

    class_concepts,
    crop_images,
    crops_at,
    encode,
    encode_positions,
    extract_concepts,
    pooled_activations,
    unit_concepts,
)
from protonmf.backbones.layer_cut import LayerCut
from protonmf.craft.settings import CraftSettings
from protonmf.backbones.nets import SmallCNN
from protonmf.nmf import nmf

def test_grid_and_random_crops_are_the_boxes_resized():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    crops, boxes = crop_images(x, 8)
    assert crops.shape == (2 * 4, 3, 16, 16) and boxes.shape == (8, 5)
    expected = torch.nn.functional.interpolate(x[1:2, :, 8:16, 0:8], size=(16, 16), mode="bilinear", align_corners=False)
    i = int(((boxes[:, 0] == 1) & (boxes[:, 1] == 0) & (boxes[:, 2] == 8)).nonzero())
    assert float((crops[i] - expected[0]).abs().mean()) < 0.05  # the same region, resampled
    same, _ = crop_images(x, 16)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)  # a full-size crop is the image
    random, rboxes = crop_images(x, 6, n_random=5, seed=1)
    assert random.shape == (10, 3, 16, 16) and ((rboxes[:, 3] - rboxes[:, 1]) == 6).all()
    assert torch.equal(crop_images(x, 6, n_random=5, seed=1)[1], rboxes)
    with pytest.raises(ValueError, match="crop must be in"):
        crop_images(x, 17)

def test_concepts_come_from_predicted_images_and_encode_by_nnls(resnet):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(24, 3, 64, 64, generator=g)
    with torch.no_grad():
        pred = resnet.head_logits(resnet(images)).argmax(1)
    c = int(pred.mode().values)
    concepts = extract_concepts(resnet, images, c, 3, crop=32, stride=16, n_design=16)
    assert torch.equal(concepts.image_ids, (pred == c).nonzero().flatten())
    assert concepts.boxes[:, 0].long().unique().tolist() == list(range(concepts.image_ids.numel()))  # into image_ids
    assert concepts.W.shape == (3, 512) and concepts.U.shape == (concepts.image_ids.numel() * 9, 3)
    assert 0 < concepts.relative_error < 1
    assert concepts.importance.shape == (3,) and (concepts.importance >= 0).all()
    crops, _ = crop_images(images[:2], 32, stride=16)
    A = pooled_activations(resnet, crops)
    U = encode(A, concepts.W)
    ref = np.stack([scipy_nnls(concepts.W.double().numpy().T, a)[0] for a in A.double().numpy()])
    np.testing.assert_allclose(U.numpy(), ref, rtol=1e-3, atol=1e-6)
    only_c = images[pred == c]  # then no image is predicted as any other class
    with pytest.raises(ValueError, match=f"no image is predicted as class {(c + 1) % 5}"):
        extract_concepts(resnet, only_c, (c + 1) % 5, 3, crop=32)

@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return FeatureBackbone.from_model(SmallCNN(num_classes=3, width=8))

def test_a_layer_cut_gives_the_network_back(resnet, cnn):
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for backbone, layer in ((resnet, "layer3"), (resnet, "layer2"), (cnn, "layer2"), (cnn, "layer3")):
            cut = LayerCut(backbone, layer, 64)
            acts = cut.activations(x)
            assert acts.ndim == 4 and not cut.top
            torch.testing.assert_close(cut.logits(acts), backbone.model(x), rtol=1e-5, atol=1e-5)
        top = LayerCut(resnet, None, 64)
        assert top.top and torch.equal(top.activations(x), resnet(x))
    with pytest.raises(ValueError, match="layer 'layer3.0.conv1' does not cut ResNet in two"):
        LayerCut(resnet, "layer3.0.conv1", 64)  # the block's skip connection crosses it
    with pytest.raises(ValueError, match="layer 'layer9' is not a module of ResNet"):
        LayerCut(resnet, "layer9", 64)

def _images(n, seed):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))

def test_classes_batched_equal_classes_one_at_a_time(cnn):
    s = CraftSettings(n_concepts=3, crop=32, stride=16, n_design=8, tol=0, max_iter=30)
    images = [_images(4, 0), _images(7, 1)]  # different crop counts: the batch is padded
    together = class_concepts(cnn, images, [0, 2], s)
    for x, c, batched in zip(images, [0, 2], together):
        alone = class_concepts(cnn, [x], [c], s)[0]
        for name in ("W", "U"):  # the padded batch NMF is the per-class NMF
            torch.testing.assert_close(getattr(batched, name), getattr(alone, name), rtol=1e-4, atol=1e-6)
        # (importance is not compared: this random network's banks are nearly rank-deficient, so
        # the NNLS encodings of its images jump between near-optimal active sets at 1e-8 changes)
        assert batched.U.shape == (x.shape[0] * 9, 3) and batched.class_idx == c

def test_recursion_decomposes_the_crops_above_the_90th_percentile_at_the_earlier_layer(cnn):
    s = CraftSettings(n_concepts=4, crop=32, stride=16, n_design=8, sub_layers=("layer3", "layer2"), sub_concepts=2,
                      recurse=2, max_iter=50)
    x = _images(20, 3)
    cc = class_concepts(cnn, [x], [1], s)[0]
    root = cc.root
    top2 = root.importance.argsort(descending=True)[:2].tolist()
    assert {b for b in cc.banks if b.count(".") == 0 and b != "root"} == {f"c{i}" for i in top2}
    crops, _ = crop_images(x, 32, stride=16)
    cut = LayerCut(cnn, "layer3", 64)
    for i in top2:
        bank = cc.banks[f"c{i}"]
        coef = root.U[:, i]
        assert torch.equal(bank.crops, (coef > torch.quantile(coef, 0.9)).nonzero().flatten())  # λ_i: 90th percentile
        assert bank.layer == "layer3" and bank.W.shape == (2, cut.activations(x[:1]).shape[-1])
        # the sub-bank factorizes the pooled layer3 activations of exactly those crops
        A = pooled_activations(cut, crops[bank.crops])
        torch.testing.assert_close(bank.U @ bank.W, A, atol=0.5 * float(A.norm()) / A.numel() ** 0.5 + 1e-3, rtol=0.5)
        assert bank.importance.shape == (2,) and bank.importance.isfinite().all()
        for j in bank.importance.argsort(descending=True)[:2].tolist():  # the next level, at layer2
            sub = cc.banks.get(f"c{i}.{j}")
            if sub is not None:
                assert sub.layer == "layer2" and set(sub.crops.tolist()) <= set(bank.crops.tolist())
    assert any(b.count(".") == 1 for b in cc.banks)  # a third level exists
    tree = cc.tree("bird")
    assert tree["label"] == "bird" and len(tree["children"]) == 4
    node = next(n for n in tree["children"] if n["id"] == f"c{top2[0]}")
    assert [c["id"] for c in node["children"]] == [f"c{top2[0]}.0", f"c{top2[0]}.1"] and node["layer"] == "layer4"
    back = ClassConcepts.from_tensors(cc.to_tensors(), cc.meta())
    assert set(back.banks) == set(cc.banks)
    for bid, bank in cc.banks.items():
        assert torch.equal(back.banks[bid].W, bank.W) and torch.equal(back.banks[bid].crops, bank.crops)

def test_unit_concepts_keep_u_w_and_every_bank_has_unit_rows(cnn):
    g = torch.Generator().manual_seed(5)
    W = torch.rand(4, 6, generator=g, dtype=torch.float64) * torch.tensor([[0.01], [30.0], [1.0], [0.0]], dtype=torch.float64)
    U = torch.rand(10, 4, generator=g, dtype=torch.float64)
    W1, U1 = unit_concepts(W, U)
    torch.testing.assert_close(U1 @ W1, U @ W, rtol=1e-14, atol=0)
    torch.testing.assert_close(W1[:3].norm(dim=1), torch.ones(3, dtype=torch.float64), rtol=1e-14, atol=0)
    assert torch.equal(W1[3], W[3]) and torch.equal(U1[:, 3], U[:, 3])  # a dead component has no direction
    # the banks class_concepts makes, at both layers: unit rows, and U W is the NMF's own product
    s = CraftSettings(n_concepts=3, crop=32, stride=16, n_design=8, sub_layers=("layer2",), sub_concepts=2, recurse=1,
                      max_iter=30)
    x = _images(6, 5)
    cc = class_concepts(cnn, [x], [0], s)[0]
    assert len(cc.banks) == 2
    for bank in cc.banks.values():
        torch.testing.assert_close(bank.W.norm(dim=1), torch.ones(bank.W.shape[0]), rtol=1e-6, atol=0)
    crops, _ = crop_images(x, 32, stride=16)
    raw = nmf(pooled_activations(cnn, crops), 3, max_iter=30, tol=s.tol, seed=s.seed)
    assert not torch.allclose(raw.B.norm(dim=1), torch.ones(3), rtol=0.05)  # NMF alone leaves them unnormalised
    torch.testing.assert_close(cc.U @ cc.W, raw.E @ raw.B, rtol=1e-4, atol=1e-4 * float(raw.E.max() * raw.B.max()))

def test_crops_at_the_boxes_are_the_crops_and_positions_encode_by_nnls(cnn):
    x = _images(3, 4)
    crops, boxes = crop_images(x, 24, n_random=4, seed=2)
    torch.testing.assert_close(crops_at(x, boxes[5:7]), crops[5:7])
    with torch.no_grad():
        F = cnn(x)
    W = torch.rand(3, F.shape[-1], generator=torch.Generator().manual_seed(0))
    U = encode_positions(F, W)
    assert U.shape == (*F.shape[:3], 3)
    ref = scipy_nnls(W.double().numpy().T, F[1, 2, 3].clamp_min(0).double().numpy())[0]
    np.testing.assert_allclose(U[1, 2, 3].numpy(), ref, rtol=1e-3, atol=1e-5)

def test_bad_craft_inputs(cnn):
    with pytest.raises(ValueError, match=r"classes \[4\]: no image is predicted as them"):
        class_concepts(cnn, [_images(2, 0), torch.zeros(0, 3, 64, 64)], [0, 4])
    with pytest.raises(ValueError, match=r"percentile\n  Input should be less than 100"):
        CraftSettings(percentile=100)
    with pytest.raises(ValueError, match="same length|equal length"):
        class_concepts(cnn, [_images(2, 0)], [0, 1])
