"""CRAFT figures: each renders to a non-blank PNG, with the axes, order and colours it promises."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from protonmf.viz.concept_figures import (
    attribution_overlays,
    concept_sheet,
    concept_tree,
    fidelity_curves,
    importance_bars,
)
from protonmf.viz.prototype_figures import PROTOTYPE_COLORS


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _saved(fig, path, *, min_side: int = 100, dpi: int = 60) -> np.ndarray:
    """Save ``fig`` as PNG, read it back, check it is a real picture; return its pixels (H, W, C)."""
    fig.savefig(path, dpi=dpi)
    with Image.open(path) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("RGB"), dtype=float)
    assert min(pixels.shape[:2]) >= min_side
    assert max(pixels.shape[:2]) <= 20_000
    assert pixels.std() > 10, "the picture is (nearly) blank"
    return pixels


def _blobs(n: int, r: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, r, size, size) Gaussian bumps at random places: non-negative attribution maps."""
    rng = _rng(seed)
    yy, xx = np.mgrid[:size, :size]
    centres = rng.integers(0, size, (n, r, 2))
    return np.exp(-((yy - centres[..., 0, None, None]) ** 2 + (xx - centres[..., 1, None, None]) ** 2) / (size / 2))


def _same_colour(a, b) -> bool:
    return np.allclose(np.asarray(a)[:3], np.asarray(b)[:3])


# ---------------------------------------------------------------------------------------------
# concept_sheet
# ---------------------------------------------------------------------------------------------


def test_concept_sheet_rows_by_importance_coloured_by_concept_index(tmp_path):
    rng = _rng(1)
    crops = rng.random((3, 4, 16, 16, 3))
    importance = np.array([0.1, 0.7, 0.3])
    fig = concept_sheet(crops, importance, class_name="chain saw")
    _saved(fig, tmp_path / "sheet.png")
    assert len(fig.axes) == 3 * 4
    assert all(len(ax.images) == 1 for ax in fig.axes)
    firsts = fig.axes[::4]  # first crop of each row
    assert [ax.get_ylabel().split("\n")[0] for ax in firsts] == ["concept 1", "concept 2", "concept 0"]
    assert firsts[0].get_ylabel() == "concept 1\nS_T=0.70"
    for ax, concept in zip(firsts, [1, 2, 0]):
        assert _same_colour(ax.yaxis.label.get_bbox_patch().get_facecolor(), PROTOTYPE_COLORS[concept])
    # the top row shows concept 1's crops, in their order
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), crops[1, 0])
    np.testing.assert_allclose(fig.axes[3].images[0].get_array(), crops[1, 3])


def test_concept_sheet_missing_crops_are_blank_and_k_pads(tmp_path):
    rng = _rng(2)
    crops = rng.random((2, 2, 12, 12, 3))
    crops[1, 1] = np.nan  # concept 1 has a single crop
    fig = concept_sheet(crops, np.array([0.2, 0.5]), class_name="c", concept_names=["blade", "engine"], k=4)
    _saved(fig, tmp_path / "sheet.png")
    assert len(fig.axes) == 2 * 4
    shown = [len(ax.images) for ax in fig.axes]
    assert shown == [1, 0, 0, 0, 1, 1, 0, 0]  # engine (1 crop) first, then blade (2 crops)
    assert fig.axes[0].get_ylabel().startswith("engine")


def test_concept_sheet_one_concept_and_fewer_columns(tmp_path):
    crops = _rng(3).random((1, 5, 10, 10, 3))
    fig = concept_sheet(crops, np.array([0.4]), class_name="c", k=2)
    _saved(fig, tmp_path / "sheet.png", min_side=80)
    assert len(fig.axes) == 2


def test_concept_sheet_errors():
    crops = _rng(4).random((3, 2, 8, 8, 3))
    with pytest.raises(ValueError, match="importance"):
        concept_sheet(crops, np.ones(2), class_name="c")
    with pytest.raises(ValueError, match="crops"):
        concept_sheet(crops[..., 0], np.ones(3), class_name="c")
    with pytest.raises(ValueError, match="concept_names"):
        concept_sheet(crops, np.ones(3), class_name="c", concept_names=["a", "b"])
    with pytest.raises(ValueError, match="k must"):
        concept_sheet(crops, np.ones(3), class_name="c", k=0)


# ---------------------------------------------------------------------------------------------
# importance_bars
# ---------------------------------------------------------------------------------------------


def test_importance_bars_sorted_and_coloured(tmp_path):
    importance = np.array([0.05, 0.4, 0.2, 0.3])
    fig = importance_bars(importance, class_name="chain saw", concept_names=["a", "b", "c", "d"])
    _saved(fig, tmp_path / "bars.png")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["b", "d", "c", "a"]
    bars = ax.patches
    assert len(bars) == 4
    for bar, concept in zip(bars, [1, 3, 2, 0]):
        assert _same_colour(bar.get_facecolor(), PROTOTYPE_COLORS[concept])
        assert bar.get_width() == pytest.approx(importance[concept])


def test_importance_bars_one_concept(tmp_path):
    fig = importance_bars(np.array([0.3]), class_name="c")
    _saved(fig, tmp_path / "bars.png")
    assert len(fig.axes[0].patches) == 1


def test_importance_bars_errors():
    with pytest.raises(ValueError, match="importance"):
        importance_bars(np.ones((2, 2)), class_name="c")
    with pytest.raises(ValueError, match="importance"):
        importance_bars(np.ones(0), class_name="c")
    with pytest.raises(ValueError, match="concept_names"):
        importance_bars(np.ones(3), class_name="c", concept_names=["a"])


# ---------------------------------------------------------------------------------------------
# attribution_overlays
# ---------------------------------------------------------------------------------------------


def test_attribution_overlays_axes_and_top_concepts(tmp_path):
    images = _rng(5).random((2, 24, 24, 3))
    maps = _blobs(2, 4, 24)
    importance = np.array([0.1, 0.5, 0.05, 0.3])
    fig = attribution_overlays(images, maps, class_name="c", importance=importance, top=2, titles=["x", "y"])
    _saved(fig, tmp_path / "attr.png")
    assert len(fig.axes) == 2 * (2 + 2)
    column = fig.axes[:4]  # image, overlay, concept 1, concept 3
    assert column[0].get_title() == "x"
    assert column[2].get_title().startswith("concept 1")
    assert column[3].get_title().startswith("concept 3")
    assert _same_colour(column[2].spines["top"].get_edgecolor(), PROTOTYPE_COLORS[1])
    assert _same_colour(column[3].spines["top"].get_edgecolor(), PROTOTYPE_COLORS[3])
    # the overlay only colours the top concepts: where concept 0 alone is present, the image shows
    overlay = column[1].images[0].get_array()
    only_0 = (maps[0, 0] > 0.9) & (maps[0, [1, 3]].max(0) / maps[0, [1, 3]].max() < 0.05)
    if only_0.any():
        np.testing.assert_allclose(overlay[only_0], images[0][only_0])


def test_attribution_overlays_top_beyond_r_and_no_importance(tmp_path):
    images = _rng(6).random((3, 16, 16, 3))
    maps = _blobs(3, 2, 16, seed=1)
    fig = attribution_overlays(images, maps, class_name="c", top=5)
    _saved(fig, tmp_path / "attr.png")
    assert len(fig.axes) == 3 * (2 + 2)
    assert [ax.get_title() for ax in fig.axes[2:4]] == ["concept 0", "concept 1"]


def test_attribution_overlays_one_image_one_concept(tmp_path):
    images = _rng(7).random((1, 16, 16, 3))
    fig = attribution_overlays(images, _blobs(1, 1, 16), class_name="c", importance=np.array([0.9]))
    _saved(fig, tmp_path / "attr.png")
    assert len(fig.axes) == 3


def test_attribution_overlays_errors():
    images = _rng(8).random((2, 8, 8, 3))
    maps = _blobs(2, 3, 8)
    with pytest.raises(ValueError, match="maps"):
        attribution_overlays(images, maps[:1], class_name="c")
    with pytest.raises(ValueError, match="maps"):
        attribution_overlays(images, maps[..., :4], class_name="c")
    with pytest.raises(ValueError, match="importance"):
        attribution_overlays(images, maps, class_name="c", importance=np.ones(2))
    with pytest.raises(ValueError, match="images"):
        attribution_overlays(images[..., 0], maps, class_name="c")
    with pytest.raises(ValueError, match="titles"):
        attribution_overlays(images, maps, class_name="c", titles=["only one"])
    with pytest.raises(ValueError, match="top"):
        attribution_overlays(images, maps, class_name="c", top=0)


# ---------------------------------------------------------------------------------------------
# concept_tree
# ---------------------------------------------------------------------------------------------


def _node(node_id, label, children=(), **extra):
    return {"id": node_id, "label": label, "children": list(children), **extra}


def _three_levels():
    """root → c0 (→ c0.0 → c0.0.0, c0.0.1; c0.1), c1 (no children), c2 (→ c2.0)."""
    return _node(
        "root",
        "chain saw",
        [
            _node(
                "c0",
                "concept 0",
                [
                    _node("c0.0", "sub-concept 0", [_node("c0.0.0", "blade edge", layer="layer2"), _node("c0.0.1", "teeth", layer="layer2")],
                          importance=0.3, layer="layer3"),
                    _node("c0.1", "sub-concept 1", importance=0.1, layer="layer3"),
                ],
                importance=0.5,
                layer="layer4",
            ),
            _node("c1", "concept 1", importance=0.2, layer="layer4"),
            _node("c2", "concept 2", [_node("c2.0", "sub-concept A", importance=0.05, layer="layer3")], importance=0.1, layer="layer4"),
        ],
    )


def test_concept_tree_depth_three_with_thumbnails(tmp_path):
    rng = _rng(9)
    crops = {"c0": rng.random((5, 12, 12, 3)), "c0.0.1": rng.random((2, 12, 12, 3)), "c2.0": rng.random((3, 12, 12, 3))}
    crops["c2.0"][1] = np.nan  # a missing crop is skipped
    fig = concept_tree(_three_levels(), class_name="chain saw", crops=crops)
    _saved(fig, tmp_path / "tree.png")
    assert len(fig.axes) == 1 + 3 + 2 + 2
    ax = fig.axes[0]
    # a parent sits midway over its first and last child; leaves left to right in tree order
    xs = {t.get_text(): t.get_position()[0] for t in ax.texts}
    assert xs["concept 0"] == pytest.approx((xs["sub-concept 0"] + xs["sub-concept 1"]) / 2)
    assert xs["sub-concept 0"] == pytest.approx((xs["blade edge"] + xs["teeth"]) / 2)
    assert xs["blade edge"] < xs["teeth"] < xs["concept 1"] < xs["concept 2"]
    assert xs["chain saw"] == pytest.approx((xs["concept 0"] + xs["concept 2"]) / 2)
    assert "layer4 · S_T=0.50" in xs
    # top-level concepts take their colour by position; sub-concepts a lighter shade of it
    boxes = ax.patches  # drawn parents first: root, c0, c0.0, ...
    assert len(boxes) == 9
    assert _same_colour(boxes[1].get_facecolor(), PROTOTYPE_COLORS[0])
    assert all(b > a for a, b in zip(PROTOTYPE_COLORS[0], boxes[2].get_facecolor()[:3]))


def test_concept_tree_root_only_and_deep_chain(tmp_path):
    fig = concept_tree(_node("root", "lonely class"), class_name="c")
    _saved(fig, tmp_path / "root.png", min_side=60)
    assert len(fig.axes) == 1

    chain = _node("leaf", "level 8")
    for level in range(7, -1, -1):
        chain = _node(f"n{level}", f"level {level}", [chain], importance=level / 10, layer=f"layer{level}")
    fig = concept_tree(chain, class_name="c", crops={"leaf": _rng(10).random((1, 8, 8, 3))})
    _saved(fig, tmp_path / "chain.png", dpi=30)
    assert len(fig.axes) == 2
    assert len(fig.axes[0].patches) == 9


def test_concept_tree_errors():
    tree = _three_levels()
    with pytest.raises(ValueError, match="crops"):
        concept_tree(tree, class_name="c", crops={"nope": np.zeros((1, 4, 4, 3))})
    with pytest.raises(ValueError, match=r"crops\['c0'\]"):
        concept_tree(tree, class_name="c", crops={"c0": np.zeros((4, 4, 3))})
    with pytest.raises(TypeError, match="tree"):
        concept_tree([tree], class_name="c")
    with pytest.raises(TypeError, match="tree: every node must be a dict, got str under node 'root'"):
        concept_tree(_node("root", "r", ["not a node"]), class_name="c")
    with pytest.raises(TypeError, match="'children' of node 'root' must be a list"):
        concept_tree({"id": "root", "label": "r", "children": "c0"}, class_name="c")


# ---------------------------------------------------------------------------------------------
# fidelity_curves
# ---------------------------------------------------------------------------------------------


def test_fidelity_curves_two_panels_with_auc(tmp_path):
    r = 6
    steps = np.linspace(1, 0, r + 1)
    curves = {
        "sobol": {"deletion": steps**3, "insertion": 1 - steps**3},
        "tcav": {"deletion": steps, "insertion": 1 - steps},
    }
    auc = {"sobol": {"deletion": 0.25, "insertion": 0.75}}
    fig = fidelity_curves(curves, auc=auc, title="chain saw")
    _saved(fig, tmp_path / "fidelity.png")
    deletion, insertion = fig.axes
    assert len(fig.axes) == 2
    assert "deletion" in deletion.get_title() and "insertion" in insertion.get_title()
    assert len(deletion.lines) == len(insertion.lines) == 2
    np.testing.assert_allclose(deletion.lines[0].get_xdata(), np.arange(r + 1) / r)
    np.testing.assert_allclose(deletion.lines[0].get_ydata(), curves["sobol"]["deletion"])
    labels = [t.get_text() for t in deletion.get_legend().get_texts()]
    assert labels == ["sobol (AUC=0.250)", "tcav"]
    # a ranking keeps its colour across the panels
    assert deletion.lines[1].get_color() == insertion.lines[1].get_color()


def test_fidelity_curves_one_panel_missing(tmp_path):
    fig = fidelity_curves({"sobol": {"deletion": np.array([1.0, 0.2])}})
    _saved(fig, tmp_path / "fidelity.png")
    assert len(fig.axes[0].lines) == 1 and len(fig.axes[1].lines) == 0


def test_fidelity_curves_errors():
    good = {"sobol": {"deletion": np.ones(3), "insertion": np.ones(3)}}
    with pytest.raises(ValueError, match="curves"):
        fidelity_curves({})
    with pytest.raises(ValueError, match=r"curves\['sobol'\]\['deletion'\]"):
        fidelity_curves({"sobol": {"deletion": np.ones((3, 2))}})
    with pytest.raises(ValueError, match=r"curves\['sobol'\]\['deletion'\]"):
        fidelity_curves({"sobol": {"deletion": np.ones(1)}})
    with pytest.raises(ValueError, match="curves"):
        fidelity_curves({"sobol": {"removal": np.ones(3)}})
    with pytest.raises(ValueError, match="auc"):
        fidelity_curves(good, auc={"tcav": {"deletion": 0.5}})


# ---------------------------------------------------------------------------------------------
# pyplot state
# ---------------------------------------------------------------------------------------------


def test_no_pyplot_figure_is_left_open():
    before = plt.get_fignums()
    rng = _rng(11)
    concept_sheet(rng.random((2, 2, 8, 8, 3)), np.ones(2), class_name="c")
    importance_bars(np.ones(2), class_name="c")
    attribution_overlays(rng.random((1, 8, 8, 3)), _blobs(1, 2, 8), class_name="c")
    concept_tree(_three_levels(), class_name="c")
    fidelity_curves({"a": {"deletion": np.ones(3)}})
    assert plt.get_fignums() == before
