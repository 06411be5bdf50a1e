"""Part localization metrics on hand-made heatmaps whose answers are known."""

import pytest
import torch

from protonmf.evaluation.localization import class_localization, part_localization


def masks_and_maps():
    # 4 images 4×4: part 1 in the top-left 2×2, part 2 in the bottom-right 2×2, rest background.
    masks = torch.zeros(4, 4, 4, dtype=torch.long)
    masks[:, :2, :2] = 1
    masks[:, 2:, 2:] = 2
    maps = torch.zeros(4, 3, 4, 4)
    maps[:, 0, :2, :2] = 1.0  # prototype 0 = part 1, exactly
    maps[:, 1, 2:, 2:] = 1.0  # prototype 1 = part 2, exactly
    maps[:, 1, 3, 3] = 3.0
    maps[:, 2, 0, 3] = 1.0  # prototype 2: background in 3 images, part 2 in one
    maps[3, 2] = 0
    maps[3, 2, 2, 2] = 1.0
    return maps, masks


def test_known_answers():
    maps, masks = masks_and_maps()
    m = class_localization(maps, masks, n_parts=2)
    assert m["majority_part"] == [1, 2, 0]
    assert m["purity"] == [1.0, 1.0, 0.75]
    assert m["coverage"] == 2
    assert m["on_object"] == pytest.approx(9 / 12)
    assert m["iou"][0] == pytest.approx(1.0) and m["iou_part"][:2] == [1, 2]
    assert m["iou"][1] == pytest.approx(0.25)  # only the 3.0 pixel passes half the maximum: 1 of 4


def test_over_classes_and_shape_errors():
    maps, masks = masks_and_maps()
    out = part_localization(torch.cat([maps, maps]), torch.cat([masks, masks]), torch.tensor([0] * 4 + [1] * 4), n_parts=2)
    assert set(out["per_class"]) == {0, 1} and out["coverage"] == 2.0
    assert out["purity"] == pytest.approx((1 + 1 + 0.75) / 3)
    with pytest.raises(ValueError, match="do not match"):
        class_localization(maps, masks[:, :2], n_parts=2)
