"""Tests of protonmf.demo.shapes: the second part-annotated set (cap, trunk, base), and its source."""

from __future__ import annotations

import numpy as np
import pytest

from protonmf.config import parse_config
from protonmf.data.sources import make_source
from protonmf.demo.shapes import SHAPE_PART_NAMES, make_shapes
from protonmf.pipeline.datasets import make_split_source
from tests.demo.test_synthetic import _cv_accuracy, _part_means


@pytest.fixture(scope="module")
def data10():
    return make_shapes(10, 40, image_size=64, seed=3)


def test_arrays_labels_and_names():
    d = make_shapes(4, 3, image_size=48, seed=0)
    assert d.images.shape == (12, 48, 48, 3) and d.images.dtype == np.uint8
    assert d.masks.shape == (12, 48, 48) and d.masks.dtype == np.uint8
    np.testing.assert_array_equal(d.labels, np.repeat(np.arange(4), 3))
    assert d.part_names == SHAPE_PART_NAMES == ("background", "cap", "trunk", "base")
    assert d.class_names[0] == "s000_ringscrimsondome-hatchedcoraltrunk-brownbase"
    assert len(set(make_shapes(125, 1).class_names)) == 125


def test_deterministic_and_seed_dependent():
    a, b, c = make_shapes(3, 4, seed=1), make_shapes(3, 4, seed=1), make_shapes(3, 4, seed=2)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert all(not np.array_equal(x, y) for x, y in zip(a.images, c.images))


def test_every_part_visible_inside_the_image_and_upright(data10):
    counts = np.stack([(data10.masks == k).sum((1, 2)) for k in (1, 2, 3)], axis=1)
    assert counts.min() >= 30, counts.min(0)
    m = data10.masks
    assert not m[:, [0, -1], :].any() and not m[:, :, [0, -1]].any()  # never cut by the border
    ys = np.mgrid[:64, :64][0]
    cy = [((m == k) * ys).sum((1, 2)) / (m == k).sum((1, 2)) for k in (1, 2, 3)]
    assert (cy[0] < cy[1]).all() and (cy[1] < cy[2]).all()  # cap above trunk above base, always


def test_class_is_in_the_parts_not_the_background(data10):
    assert _cv_accuracy(_part_means(data10), data10.labels) > 0.95
    img, bg = data10.images.astype(np.float64), (data10.masks == 0)[..., None]
    bg_mean = (img * bg).sum((1, 2)) / bg.sum((1, 2))
    assert _cv_accuracy(bg_mean, data10.labels) < 0.2


def test_a_run_reads_it_as_the_synthetic_set_is_read():
    config = parse_config({"data": {"source": "shapes", "n_classes": 3, "max_images_per_class": 4,
                                    "preprocess": {"resize": 64, "crop": 64, "mean": [0.5] * 3, "std": [0.25] * 3}},
                           "backbone": {"arch": "protonmf:small_cnn", "num_classes": 3}})
    train = make_split_source(config, "train")
    assert len(train.records) == 12 and train.records[0].uri.startswith("shapes://seed0/train/s000_")
    assert train.keypoint_names == ("cap", "trunk", "base") and train.masks.shape == (12, 64, 64)
    np.testing.assert_array_equal(train.data.images, make_shapes(3, 4, seed=0).images)
    x, y, visible = train.records[0].keypoints[0]
    assert visible and train.mask(train.records[0])[int(y), int(x)] in (1, 2)  # the cap's centre lies on the cap (or the trunk it sits on)
    val = make_source("shapes", n_classes=3, n_per_class=2, split="val")
    assert not np.array_equal(val.data.images[:2], train.data.images[:2])
