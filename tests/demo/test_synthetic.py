"""Tests of protonmf.demo.synthetic: the procedurally drawn, part-annotated demo data."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from protonmf.demo.synthetic import (
    MAX_CLASSES,
    N_LOOKS,
    PART_LOOKS,
    SyntheticParts,
    class_looks,
    make_synthetic_parts,
    mask_root,
    write_image_folder,
)


@pytest.fixture(scope="module")
def data10() -> SyntheticParts:
    return make_synthetic_parts(10, 60, image_size=64, seed=3)


def _part_means(d: SyntheticParts, parts=(1, 2, 3)) -> np.ndarray:
    """Mean RGB of each image's pixels of each part in ``parts``: (N, 3 * len(parts))."""
    img = d.images.astype(np.float64)
    feats = []
    for k in parts:
        m = (d.masks == k)[..., None]
        feats.append((img * m).sum((1, 2)) / m.sum((1, 2)))
    return np.concatenate(feats, axis=1)


def _cv_accuracy(X: np.ndarray, y: np.ndarray) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(cross_val_score(clf, X, y, cv=4).mean())


def test_shapes_dtypes_and_labels():
    d = make_synthetic_parts(4, 3, image_size=40, seed=0)
    assert d.images.shape == (12, 40, 40, 3) and d.images.dtype == np.uint8
    assert d.masks.shape == (12, 40, 40) and d.masks.dtype == np.uint8
    assert d.labels.shape == (12,) and d.labels.dtype == np.int64
    np.testing.assert_array_equal(d.labels, np.repeat(np.arange(4), 3))
    assert len(d.class_names) == 4
    assert d.part_names == ("background", "head", "body", "tail")
    assert set(np.unique(d.masks).tolist()) == {0, 1, 2, 3}
    assert d.class_names[0] == "c000_redhead-stripedorangebody-cyantail"


def test_deterministic_and_seed_dependent():
    a = make_synthetic_parts(3, 5, seed=11)
    b = make_synthetic_parts(3, 5, seed=11)
    c = make_synthetic_parts(3, 5, seed=12)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.class_names == b.class_names
    # a different seed changes (nearly) every image and mask
    assert np.mean([not np.array_equal(x, y) for x, y in zip(a.images, c.images)]) == 1.0
    assert np.mean([not np.array_equal(x, y) for x, y in zip(a.masks, c.masks)]) > 0.9
    assert a.class_names == c.class_names  # class definitions do not depend on the seed


def test_every_part_visible_and_object_inside(data10):
    S = 64
    counts = np.stack([(data10.masks == k).sum((1, 2)) for k in (1, 2, 3)], axis=1)  # (N, 3)
    assert counts.min() >= 20, counts.min(0)  # head, body, tail each >= 20 px of 4096
    assert counts.sum(1).max() < 0.25 * S * S  # the object never fills the image
    border = np.concatenate(
        [data10.masks[:, 0, :], data10.masks[:, -1, :], data10.masks[:, :, 0], data10.masks[:, :, -1]], axis=1
    )
    frac_on_border = (border > 0).mean(1)
    assert frac_on_border.max() <= 0.01


@pytest.mark.parametrize("S", [32, 128])
def test_parts_visible_at_other_sizes(S):
    d = make_synthetic_parts(5, 20, image_size=S, seed=2)
    counts = np.stack([(d.masks == k).sum((1, 2)) for k in (1, 2, 3)], axis=1)
    assert counts.min() >= 0.004 * S * S  # >= 4 px at 32, >= 65 px at 128
    assert not d.masks[:, [0, -1], :].any() and not d.masks[:, :, [0, -1]].any()


def test_mask_is_a_label_map_and_parts_are_adjacent(data10):
    # one label per pixel, values only 0..3
    assert data10.masks.max() == 3
    # head and tail touch the body (a connected creature, not three scattered shapes)
    m = data10.masks
    body = m == 2
    grown = body.copy()
    grown[:, 1:] |= body[:, :-1]
    grown[:, :-1] |= body[:, 1:]
    grown[:, :, 1:] |= body[:, :, :-1]
    grown[:, :, :-1] |= body[:, :, 1:]
    assert ((grown & (m == 1)).sum((1, 2)) > 0).all()
    assert ((grown & (m == 3)).sum((1, 2)) > 0).all()


def test_nuisance_varies_within_a_class(data10):
    d = data10
    idx = np.arange(60)  # class 0
    ys, xs = np.mgrid[:64, :64]
    def centroid(k):
        m = d.masks[idx] == k
        return (m * xs).sum((1, 2)) / m.sum((1, 2)), (m * ys).sum((1, 2)) / m.sum((1, 2))
    hx, hy = centroid(1)
    bx, by = centroid(2)
    size = (d.masks[idx] > 0).sum((1, 2))
    assert 0.2 < np.mean(hx > bx) < 0.8  # faces right and left (flip)
    assert np.std(bx) > 4 and np.std(by) > 4  # position varies
    assert size.max() > 1.6 * size.min()  # scale varies
    angle = np.degrees(np.arctan2(hy - by, np.abs(hx - bx)))
    assert angle.max() - angle.min() > 30  # rotation varies
    # the background is not uniform: clutter on top of pixel noise (std 4)
    img = d.images[idx].astype(np.float64)
    bg_std = [img[i][d.masks[i] == 0].std(0).mean() for i in range(len(idx))]
    assert np.median(bg_std) > 8


def test_class_combinations_distinct_and_shared():
    looks = class_looks(MAX_CLASSES)
    assert MAX_CLASSES == N_LOOKS**3 >= 50
    assert len({tuple(r) for r in looks.tolist()}) == MAX_CLASSES
    assert looks.min() == 0 and looks.max() == N_LOOKS - 1
    # a prefix of the class list is the same whatever n_classes is
    np.testing.assert_array_equal(class_looks(17), looks[:17])
    # the first 5 classes differ in every part, the first 25 in at least two parts
    first5 = looks[:5]
    assert all((first5[i] != first5[j]).all() for i in range(5) for j in range(i + 1, 5))
    first25 = looks[:25]
    diff = (first25[:, None, :] != first25[None, :, :]).sum(-1)
    assert diff[~np.eye(25, dtype=bool)].min() == 2
    # from 25 classes on, every look of every part is shared by exactly n_classes / 5 classes
    for n in (25, 50, 125):
        for part in range(3):
            np.testing.assert_array_equal(np.bincount(class_looks(n)[:, part], minlength=N_LOOKS), n // N_LOOKS)
    names = make_synthetic_parts(MAX_CLASSES, 1, image_size=32).class_names
    assert len(set(names)) == MAX_CLASSES
    h, b, t = looks[7]
    assert names[7] == f"c007_{PART_LOOKS[0][h]}head-{PART_LOOKS[1][b]}body-{PART_LOOKS[2][t]}tail"


def test_class_learnable_from_parts_not_from_background(data10):
    d = data10
    chance = 1 / 10
    acc_parts = _cv_accuracy(_part_means(d), d.labels)
    assert acc_parts > 0.95
    img = d.images.astype(np.float64)
    bg = (d.masks == 0)[..., None]
    n_bg = bg.sum((1, 2))
    bg_mean = (img * bg).sum((1, 2)) / n_bg
    bg_std = np.sqrt((((img - bg_mean[:, None, None]) ** 2) * bg).sum((1, 2)) / n_bg)
    acc_bg = _cv_accuracy(np.concatenate([bg_mean, bg_std], axis=1), d.labels)
    assert acc_bg < 2 * chance, acc_bg


def test_no_single_part_determines_the_class():
    d = make_synthetic_parts(25, 24, image_size=64, seed=5)
    assert _cv_accuracy(_part_means(d), d.labels) > 0.95
    for part in (1, 2, 3):
        # one part's look is shared by 5 classes: at best 1/5 accuracy from it alone
        acc = _cv_accuracy(_part_means(d, parts=(part,)), d.labels)
        assert acc < 0.3, (part, acc)


def test_write_image_folder(tmp_path):
    from torchvision.datasets import ImageFolder

    d = make_synthetic_parts(3, 4, image_size=32, seed=1)
    root = tmp_path / "synth"
    write_image_folder(d, root)
    assert mask_root(root) == tmp_path / "synth_masks"
    assert sorted(p.name for p in root.iterdir()) == d.class_names
    assert sorted(p.name for p in (tmp_path / "synth_masks").iterdir()) == d.class_names

    ds = ImageFolder(str(root))
    assert ds.classes == d.class_names
    assert len(ds) == 12
    np.testing.assert_array_equal(ds.targets, d.labels)
    for i, (path, target) in enumerate(ds.samples):
        assert path == str(root / d.class_names[target] / f"{i:06d}.png")
        np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), d.images[i])
        mask = np.asarray(Image.open(mask_root(root) / d.class_names[target] / f"{i:06d}.png"))
        np.testing.assert_array_equal(mask, d.masks[i])
    # writing again (same root) is fine and leaves the same files
    write_image_folder(d, str(root))
    assert len(ImageFolder(str(root))) == 12


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_classes=0, n_per_class=1), "n_classes"),
        (dict(n_classes=MAX_CLASSES + 1, n_per_class=1), f"n_classes must be <= {MAX_CLASSES}"),
        (dict(n_classes=2, n_per_class=0), "n_per_class"),
        (dict(n_classes=2, n_per_class=1, image_size=31), "image_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_parts(**kwargs)
