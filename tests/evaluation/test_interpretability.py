"""Consistency and stability (Huang et al., ICCV 2023): hand-computed scores, on the functions and
end to end on a CUB-layout tree with a stub network whose maps peak where we put a bright square."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from protonmf import PrototypeModel
from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.data.preprocess import Preprocess
from protonmf.data.sources.cub import CUBSource
from protonmf.evaluation.held_out import evaluate_model
from protonmf.evaluation.interpretability import (
    box_half_size,
    consistency,
    noise_seeds,
    part_vectors,
    peak_locations,
    perturb,
    stability,
)


def test_box_is_72_px_at_224_and_scales_with_the_image():
    assert box_half_size(224) == 36 and box_half_size(448) == 72 and box_half_size(64) == pytest.approx(10.2857, abs=1e-4)


def test_peak_is_the_maximum_of_the_bicubic_upsampled_map():
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, 1, 2] = 1.0  # cell (x=2, y=1) of a 4×4 grid on a 32×32 image: pixels 16..23 × 8..15
    maps[0, 1, 3, 0] = 2.0
    peaks = peak_locations(maps, (32, 32))
    up = torch.nn.functional.interpolate(maps, size=(32, 32), mode="bicubic", align_corners=False)
    for i in range(2):
        y, x = divmod(int(up[0, i].argmax()), 32)
        assert peaks[0, i].tolist() == [x, y]
    assert 16 <= peaks[0, 0, 0] <= 23 and 8 <= peaks[0, 0, 1] <= 15


def test_part_vector_holds_the_visible_keypoints_inside_the_closed_box():
    peaks = torch.tensor([[[100.0, 100.0]]])  # one image, one prototype
    keypoints = torch.tensor([[[136.0, 64.0], [137.0, 100.0], [100.0, 120.0], [90.0, 90.0]]])
    visible = torch.tensor([[True, True, True, False]])
    o = part_vectors(peaks, keypoints, visible, 36)
    assert o.tolist() == [[[True, False, True, False]]]  # on the edge: in; 37 px: out; not visible: out


def test_consistency_averages_over_the_images_where_the_part_is_visible():
    # class 0, one prototype, 5 images, 2 parts. Part 0 in the box in 4 of 5 images (0.8: consistent).
    o0 = torch.tensor([[1, 0], [1, 1], [1, 0], [1, 0], [0, 1]], dtype=torch.bool).unsqueeze(1)
    vis0 = torch.ones(5, 2, dtype=torch.bool)
    # class 1: part 0 in 3 of 5 (0.6); part 1 in 3 of the 4 images where visible (0.75): not consistent,
    # though counting the invisible image's vector would give 4/5 = 0.8.
    o1 = torch.tensor([[1, 1], [1, 1], [1, 1], [0, 0], [0, 1]], dtype=torch.bool).unsqueeze(1)
    vis1 = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1], [1, 0]], dtype=torch.bool)
    o, vis = torch.cat([o0, o1 & vis1.unsqueeze(1)]), torch.cat([vis0, vis1])
    labels = torch.tensor([0] * 5 + [1] * 5)
    res = consistency(o, vis, labels)
    assert res["per_class"] == {0: [True], 1: [False]}
    assert res["score"] == 50.0 and res["n_prototypes"] == 2


def test_stability_is_the_mean_share_of_unchanged_vectors():
    o = torch.zeros(4, 2, 3, dtype=torch.bool)
    noisy = o.clone()
    noisy[0, 0, 1] = True  # prototype 0 of class 0 changes on 1 of its 2 images
    noisy[3, 1, 2] = True  # prototype 1 of class 1 changes on 1 of its 2 images
    res = stability(o, noisy, torch.tensor([0, 0, 1, 1]))
    assert res["per_class"] == {0: [0.5, 1.0], 1: [1.0, 0.5]}
    assert res["score"] == 75.0


def test_noise_is_seeded_per_image_gaussian_clipped_to_a_quarter():
    x = torch.zeros(64, 3, 32, 32)
    seeds = noise_seeds(0, [f"c/{i}.png" for i in range(64)])
    assert len(set(seeds)) == 64 and seeds == noise_seeds(0, [f"c/{i}.png" for i in range(64)])
    assert seeds != noise_seeds(1, [f"c/{i}.png" for i in range(64)])
    a = perturb(x, seeds)
    assert torch.equal(a, perturb(x, seeds))
    assert float(a.abs().max()) == pytest.approx(0.25)
    expected = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(seeds[5])) * 0.2
    torch.testing.assert_close(a[5], expected.clamp(-0.25, 0.25), rtol=0, atol=0)
    assert torch.equal(perturb(x[5:7], seeds[5:7]), a[5:7])  # an image's noise does not depend on its batch


# ------------------------------------------------------------------------- end to end on CUB

class Cells(nn.Module):
    """Features = mean colour of each 32 × 32 cell (a 224 px image gives a 7 × 7 × 3 grid); the
    head reads channel 0 only, so every map of a class peaks on the brightest red cell."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.pool = nn.AvgPool2d(32)
        self.fc = nn.Linear(3, n_classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]] * n_classes) * torch.arange(1, n_classes + 1).view(-1, 1))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(x).mean((2, 3)))


# Per class: the red cell (grid x, y) of its images, and per image the keypoints' offsets from the
# cell's centre (in px of the 224 px crop) with their visibility. Box: ±36 px around the peak.
IN, OUT = (10, 5), (60, 0)
DESIGN = {
    0: ((1, 1), [  # part 0 in the box in 4 of 4: the prototype is consistent
        [(IN, 1), (OUT, 1), (IN, 1)],
        [(IN, 1), (OUT, 1), (IN, 1)],
        [(IN, 1), (OUT, 1), (IN, 1)],
        [(IN, 1), (OUT, 1), (OUT, 1)],
    ]),
    1: ((4, 4), [  # part 0: 3 of 5; part 1: 3 of the 4 images where visible (0.75); part 2 never visible
        [(IN, 1), (IN, 1), (IN, 0)],
        [(IN, 1), (IN, 1), (IN, 0)],
        [(IN, 1), (IN, 1), (IN, 0)],
        [(OUT, 1), (OUT, 1), (IN, 0)],
        [(OUT, 1), (IN, 0), (IN, 0)],
    ]),
}
BOX = (40, 20)  # every bounding box starts here and is 224 × 224, inside a 300 × 260 image


def write_cub(root: Path) -> None:
    names = ["001.Red_cell_at_1_1", "002.Red_cell_at_4_4"]
    rows, locs, k = [], [], 0
    for c, ((gx, gy), images) in DESIGN.items():
        for j, parts in enumerate(images):
            k += 1
            a = np.zeros((260, 300, 3), dtype=np.uint8)
            x0, y0 = BOX[0] + 32 * gx, BOX[1] + 32 * gy
            a[y0 : y0 + 32, x0 : x0 + 32, 0] = 200 + 10 * j
            path = f"{names[c]}/img_{k:03d}.png"
            (root / "images" / names[c]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(root / "images" / path)
            rows.append((k, c + 1, path))
            for part, ((dx, dy), vis) in enumerate(parts):
                locs.append(f"{k} {part + 1} {x0 + 16 + dx:.1f} {y0 + 16 + dy:.1f} {vis}\n")
    (root / "classes.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    (root / "images.txt").write_text("".join(f"{k} {p}\n" for k, _, p in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{k} {c}\n" for k, c, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{k} 0\n" for k, _, _ in rows))
    (root / "bounding_boxes.txt").write_text("".join(f"{k} {BOX[0]}.0 {BOX[1]}.0 224.0 224.0\n" for k, _, _ in rows))
    (root / "parts").mkdir()
    (root / "parts" / "parts.txt").write_text("1 beak\n2 tail\n3 wing\n")
    (root / "parts" / "part_locs.txt").write_text("".join(locs))


def test_cub_records_carry_keypoints_in_the_cropped_image(tmp_path):
    write_cub(tmp_path)
    source = CUBSource(str(tmp_path), split="test")
    assert source.keypoint_names == ("beak", "tail", "wing")
    first = source.records[0]
    assert first.size == (224, 224)
    assert first.keypoints == ((32 + 16 + 10, 32 + 16 + 5, True), (32 + 16 + 60, 32 + 16, True), (58.0, 53.0, True))
    assert source.records[4].keypoints[2][2] is False  # visible = 0 in part_locs.txt
    assert CUBSource(str(tmp_path), split="test", crop=False).records[0].keypoints is None


def test_scores_on_a_cub_tree_match_the_hand_count(tmp_path):
    write_cub(tmp_path)
    source = CUBSource(str(tmp_path), split="test")
    preprocess = Preprocess(resize=224, crop=224, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    backbone = FeatureBackbone.from_model(Cells(2), feature_layer="pool", head="fc")
    images = torch.stack([preprocess(source.load(r)[0]) for r in source.records])
    labels = torch.tensor([r.label for r in source.records])
    for residual in ("equal", "distributed"):
        model = PrototypeModel.fit(backbone, images, labels, p=[1], residual=residual)
        result = evaluate_model(model, source, preprocess, batch_size=4, workers=0)
        # class 0's prototype is consistent, class 1's is not; the red square outshines the noise
        assert result["consistency"] == {1: {"codes": 50.0, "presence": 50.0, "activation": 50.0}}
        assert result["stability"] == {1: {"codes": 100.0, "presence": 100.0, "activation": 100.0}}


def test_no_keypoints_no_scores(tmp_path):
    write_cub(tmp_path)
    (tmp_path / "parts" / "part_locs.txt").unlink()
    source = CUBSource(str(tmp_path), split="test")
    assert source.keypoint_names is None
    preprocess = Preprocess(resize=224, crop=224, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    backbone = FeatureBackbone.from_model(Cells(2), feature_layer="pool", head="fc")
    images = torch.stack([preprocess(source.load(r)[0]) for r in source.records])
    model = PrototypeModel.fit(backbone, images, torch.tensor([r.label for r in source.records]), p=[1])
    result = evaluate_model(model, source, preprocess, batch_size=4, workers=0)
    assert "consistency" not in result and "stability" not in result


def test_points_follow_resize_and_centre_crop_as_the_pixels_do():
    pre = Preprocess(resize=100, crop=80, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    # 300 × 200 → 150 × 100 → centre crop from (35, 10): (150, 100) lands on (40, 40)
    xy, inside = pre.map_points(np.array([[150.0, 100.0], [10.0, 10.0]]), (300, 200))
    np.testing.assert_allclose(xy, [[40.0, 40.0], [-30.0, -5.0]])
    assert inside.tolist() == [True, False]
    a = np.zeros((200, 300, 3), dtype=np.uint8)
    a[96:104, 146:154] = 255  # a bright 8 × 8 square centred on (150, 100)
    out = pre(Image.fromarray(a))[0]
    y, x = np.unravel_index(int(out.argmax()), out.shape)
    assert abs(x - 40) <= 1 and abs(y - 40) <= 1


def test_synthetic_keypoints_are_the_centres_of_the_part_masks():
    from protonmf.data import make_source

    source = make_source("synthetic", name="s", n_classes=2, n_per_class=3, split="val", image_size=64, seed=0)
    assert source.keypoint_names == ("head", "body", "tail")
    for r in source.records:
        mask = source.mask(r)
        for j, (x, y, visible) in enumerate(r.keypoints, 1):
            ys, xs = np.nonzero(mask == j)
            assert visible == (len(xs) > 0) and r.size == (64, 64)
            if visible:
                assert (x, y) == pytest.approx((xs.mean(), ys.mean()), abs=1e-9)
