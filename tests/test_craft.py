"""CRAFT slice: crops, concepts from predicted images, NNLS encoding, Sobol importance."""

import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls

from protonmf.craft import crop_images, encode, extract_concepts, pooled_activations


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
    assert set(concepts.boxes[:, 0].long().tolist()) <= set(concepts.image_ids.tolist())
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
