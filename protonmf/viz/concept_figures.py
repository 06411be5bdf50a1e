"""Pictures of CRAFT concepts (matplotlib, Agg): what each concept is, how much it matters, where it is.

- :func:`concept_sheet`: the top crops of each concept, one row per concept, rows by decreasing
  importance, each row labelled with the concept's name and total Sobol index (CRAFT Figure 2,
  left: the crops that maximise each concept).
- :func:`importance_bars`: the total Sobol index of each concept, sorted (CRAFT Figure 2, right).
- :func:`attribution_overlays`: concept attribution maps over images: the image, the most
  important concepts' areas in their colours, one heatmap per concept (CRAFT Figure 2, bottom).
- :func:`concept_tree`: concepts and their sub-concepts found at earlier layers, level by level,
  with a few crops under each node (CRAFT Figure 3, the recursive decomposition).
- :func:`fidelity_curves`: deletion and insertion curves in concept space, one line per ranking
  of the concepts (CRAFT Figure 5).

Notation: r concepts, k crops per concept, N images of H × W pixels. Concept i is drawn in
``prototype_colour(i)`` (:mod:`protonmf.viz.prototype_figures`), i its index in the bank, never its rank,
so that a concept keeps its colour from one figure to the next. Importance is CRAFT's total Sobol
index S_T (:func:`protonmf.sobol.concept_importance`).

Every function is pure: numpy arrays in, a :class:`matplotlib.figure.Figure` out. Figures are
built with ``Figure()`` directly, not through pyplot, so no pyplot state is created or left
behind; callers save them (``fig.savefig(path)``) and may drop them without ``plt.close``
(``plt.close(fig)`` is harmless too). Shape errors raise ValueError naming the argument; a tree that is not
made of dicts and lists raises TypeError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec, SubplotSpec
from matplotlib.patches import FancyBboxPatch

from protonmf.viz.prototype_figures import prototype_colour, prototype_overlay

__all__ = ["attribution_overlays", "concept_sheet", "concept_tree", "fidelity_curves", "importance_bars"]

_BLANK_EDGE = (0.8, 0.8, 0.8)


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _ink(color: Sequence[float]) -> str:
    """Black or white text, whichever reads on ``color``."""
    r, g, b = color[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.6 else "white"


def _lighten(color: Sequence[float], amount: float) -> np.ndarray:
    c = np.asarray(color[:3], dtype=float)
    return c + (1 - c) * amount


def _importance(importance: Any, r: int, source: str) -> np.ndarray:
    arr = np.asarray(importance, dtype=float)
    if arr.ndim != 1 or arr.shape[0] != r:
        raise ValueError(f"importance must have one value per concept ({r}, from {source}), got shape {arr.shape}")
    return arr


def _names(concept_names: Sequence[str] | None, r: int) -> list[str]:
    if concept_names is None:
        return [f"concept {i}" for i in range(r)]
    names = [str(n) for n in concept_names]
    if len(names) != r:
        raise ValueError(f"concept_names must have one name per concept ({r}), got {len(names)}")
    return names


def _order(importance: np.ndarray) -> np.ndarray:
    """Concept indices by decreasing importance (NaN last, ties in index order)."""
    key = np.where(np.isnan(importance), -np.inf, importance)
    return np.argsort(-key, kind="stable")


def _bare(ax, edge: Sequence[float] | None = None, width: float = 2.5, dashed: bool = False) -> None:
    """No ticks; spines in ``edge`` (hidden when None)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        if edge is None:
            spine.set_visible(False)
        else:
            spine.set_edgecolor(edge)
            spine.set_linewidth(width)
            if dashed:
                spine.set_linestyle((0, (3, 2)))


def _missing(crop: np.ndarray) -> bool:
    return bool(np.isnan(crop).any())


def _label_width(lines: Sequence[str], fontsize: float) -> float:
    """A rough width in inches of the longest line at ``fontsize`` points."""
    return max(len(s) for s in lines) * fontsize * 0.62 / 72


# ---------------------------------------------------------------------------------------------
# CRAFT Figure 2: crops, importances, attribution maps
# ---------------------------------------------------------------------------------------------


def _sheet_grid(labels: Sequence[str], r: int, n_cols: int) -> tuple[Figure, GridSpec]:
    """The figure of a concept sheet and its r × n_cols grid of crop cells.

    The left margin is as wide as the longest line of ``labels``, so that no label is cut.
    """
    cell, pad, top = 1.15, 0.15, 0.55
    left = 0.35 + _label_width([line for s in labels for line in s.split("\n")], 9)
    width, height = left + n_cols * cell + pad, top + r * cell + pad
    fig = Figure(figsize=(width, height))
    gs = fig.add_gridspec(
        r, n_cols, left=left / width, right=1 - pad / width, top=1 - top / height, bottom=pad / height, wspace=0.08, hspace=0.1
    )
    return fig, gs


def _draw_sheet_row(fig: Figure, gs: GridSpec, row: int, crops: np.ndarray, label: str, color: np.ndarray, n_cols: int) -> None:
    """One concept's row of a sheet: its crops (k', H, W, 3) in cells ``gs[row, :n_cols]``.

    A missing crop (NaN) or a column beyond k' is a blank dashed cell; the first cell carries
    ``label`` on a strip in the concept's ``color``.
    """
    for j in range(n_cols):
        ax = fig.add_subplot(gs[row, j])
        if j < crops.shape[0] and not _missing(crops[j]):
            ax.imshow(np.clip(crops[j], 0, 1))
            _bare(ax, color)
        else:
            _bare(ax, _BLANK_EDGE, width=1.0, dashed=True)
        if j == 0:
            ax.set_ylabel(
                label,
                rotation=0,
                ha="right",
                va="center",
                fontsize=9,
                labelpad=10,
                color=_ink(color),
                bbox={"boxstyle": "round,pad=0.35", "facecolor": color, "edgecolor": "none"},
            )


def concept_sheet(
    crops: np.ndarray,
    importance: np.ndarray,
    *,
    class_name: str,
    concept_names: Sequence[str] | None = None,
    k: int | None = None,
) -> Figure:
    """The top crops of each concept, one row per concept, rows by decreasing importance.

    Parameters
    ----------
    crops : (r, k', H, W, 3) float in [0, 1] (clipped): the k' top crops of each of r concepts.
        A crop holding any NaN is missing (fewer crops than asked for) and is drawn blank.
    importance : (r,) total Sobol index of each concept; sets the order of the rows.
    class_name : shown in the title.
    concept_names : r names; default "concept i".
    k : columns to draw; crops beyond are dropped, missing columns drawn blank. Default k'.

    Returns
    -------
    Figure with r·k image axes, row-major in the order of the rows; the first axes of each row
    carries the label "name / S_T=…" on a strip in the concept's colour.
    """
    crops = np.asarray(crops, dtype=float)
    if crops.ndim != 5 or crops.shape[-1] != 3:
        raise ValueError(f"crops must have shape (r, k, H, W, 3), got {crops.shape}")
    r, k_given = crops.shape[:2]
    if r == 0:
        raise ValueError("crops must hold at least one concept, got r = 0")
    importance = _importance(importance, r, "crops")
    names = _names(concept_names, r)
    n_cols = k_given if k is None else int(k)
    if n_cols < 1:
        raise ValueError(f"k must be ≥ 1 (crops holds {k_given} crops per concept), got {n_cols}")

    labels = [f"{names[i]}\nS_T={importance[i]:.2f}" for i in range(r)]
    fig, gs = _sheet_grid(labels, r, n_cols)
    for row, i in enumerate(_order(importance)):
        _draw_sheet_row(fig, gs, row, crops[i], labels[i], prototype_colour(int(i)), n_cols)
    fig.suptitle(f"{class_name}: top crops of each concept, by total Sobol index")
    return fig


def importance_bars(
    importance: np.ndarray,
    *,
    class_name: str,
    concept_names: Sequence[str] | None = None,
) -> Figure:
    """A horizontal bar per concept: its total Sobol index S_T, largest at the top.

    Parameters
    ----------
    importance : (r,) total Sobol index of each concept.
    class_name : shown in the title.
    concept_names : r names; default "concept i".

    Returns
    -------
    Figure with one axes; bar i in concept i's colour.
    """
    importance = np.asarray(importance, dtype=float)
    if importance.ndim != 1 or importance.shape[0] == 0:
        raise ValueError(f"importance must have shape (r,) with r ≥ 1, got {importance.shape}")
    r = importance.shape[0]
    names = _names(concept_names, r)
    order = _order(importance)
    values = np.nan_to_num(importance[order])

    fig = Figure(figsize=(5.5, max(2.2, 1.2 + 0.32 * r)))
    ax = fig.add_subplot()
    pos = np.arange(r)
    ax.barh(pos, values, color=[prototype_colour(int(i)) for i in order])
    ax.set_yticks(pos, [names[i] for i in order])
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    span = max(float(np.abs(values).max()), 1e-12)
    for p, v in zip(pos, importance[order]):
        ax.text(np.nan_to_num(v) + 0.01 * span, p, f"{v:.2f}", va="center", ha="left", fontsize=8)
    ax.set_xlim(min(0.0, float(values.min())) - 0.02 * span, max(0.0, float(values.max())) + 0.18 * span)
    ax.set_xlabel("total Sobol index $S_T$")
    ax.set_title(f"{class_name}: concept importance")
    fig.tight_layout()
    return fig


def _checked_images_and_maps(images: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """``images`` (N, H, W, 3) and ``maps`` (N, r, H, W) as float arrays, N ≥ 1 and r ≥ 1."""
    images = np.asarray(images, dtype=float)
    maps = np.asarray(maps, dtype=float)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3), got {images.shape}")
    if maps.ndim != 4:
        raise ValueError(f"maps must have shape (N, r, H, W), got {maps.shape}")
    N, H, W = images.shape[:3]
    if N == 0:
        raise ValueError("images must hold at least one image, got N = 0")
    if maps.shape[0] != N:
        raise ValueError(f"maps must have one set of maps per image: maps has {maps.shape[0]}, images has {N}")
    if maps.shape[2:] != (H, W):
        raise ValueError(f"maps must be at image resolution {(H, W)}, got {maps.shape[2:]}")
    if maps.shape[1] == 0:
        raise ValueError("maps must hold at least one concept, got r = 0")
    return images, maps


def _overlay_grid(N: int, t: int) -> tuple[Figure, GridSpec, int, int]:
    """The figure for N images and t top concepts: (fig, its 3 × N grid, lines, per_line).

    Grid rows: the images, the overlays, then the cells that hold each image's t small panels,
    laid out as ``lines`` lines of at most ``per_line`` (at most 3 a line, lines evenly filled).
    """
    lines = -(-t // 3)
    per_line = -(-t // lines)  # 4 panels as 2 × 2, not 3 + 1
    col = 2.1
    small = lines * (1 / per_line + 0.15)  # the small panels and their titles, in column widths
    width = 0.5 + N * col
    height = 0.7 + col * (2 + small)
    fig = Figure(figsize=(width, height))
    gs = fig.add_gridspec(
        3, N, height_ratios=[1, 1, small], left=0.45 / width, right=1 - 0.05 / width,
        top=1 - 0.6 / height, bottom=0.05 / height, wspace=0.06, hspace=0.15,
    )
    return fig, gs, lines, per_line


def _draw_image_and_overlay(
    fig: Figure,
    image_cell: SubplotSpec,
    overlay_cell: SubplotSpec,
    image: np.ndarray,
    maps: np.ndarray,
    chosen: np.ndarray,
    title: str,
    first: bool,
) -> None:
    """The image panel and the overlay panel of one image's column.

    ``image`` (H, W, 3) goes in ``image_cell``; ``overlay_cell`` shows the areas of the concepts
    ``chosen`` among ``maps`` (r, H, W) over it, each in its colour. The ``first`` column also
    names the two rows.
    """
    image_ax = fig.add_subplot(image_cell)
    image_ax.imshow(image)
    _bare(image_ax)
    image_ax.set_title(title, fontsize=9)
    ax = fig.add_subplot(overlay_cell)
    shown = np.zeros_like(maps)
    shown[chosen] = maps[chosen]  # zero maps never win: only top concepts are coloured, by index
    ax.imshow(prototype_overlay(image, shown))
    _bare(ax)
    if first:
        image_ax.set_ylabel("image", fontsize=9)
        ax.set_ylabel(f"top {len(chosen)} concepts", fontsize=9)


def _draw_concept_heatmaps(
    fig: Figure,
    cell: SubplotSpec,
    lines: int,
    per_line: int,
    image: np.ndarray,
    maps: np.ndarray,
    chosen: np.ndarray,
    labels: Sequence[str],
) -> None:
    """The small panels of one image's column, in ``cell``: one per concept of ``chosen``.

    Each shows the concept's map among ``maps`` (r, H, W) as a heatmap in its colour over
    ``image`` (H, W, 3), titled with its entry of ``labels``; ``lines`` lines of ``per_line``.
    """
    sub = cell.subgridspec(lines, per_line, wspace=0.1, hspace=0.5)
    for s, (i, label) in enumerate(zip(chosen, labels)):
        ax = fig.add_subplot(sub[s // per_line, s % per_line])
        one = np.zeros_like(maps)
        one[i] = maps[i]
        ax.imshow(prototype_overlay(image, one, threshold=0.0, alpha=0.75))
        _bare(ax, prototype_colour(int(i)), width=2.0)
        ax.set_title(label, fontsize=6, pad=2)


def attribution_overlays(
    images: np.ndarray,
    maps: np.ndarray,
    *,
    class_name: str,
    importance: np.ndarray | None = None,
    top: int = 3,
    titles: Sequence[str] | None = None,
    concept_names: Sequence[str] | None = None,
) -> Figure:
    """Concept attribution maps over images: one column per image.

    Each column holds the image; the areas of the ``top`` most important concepts, each in its
    colour (:func:`protonmf.viz.prototype_figures.prototype_overlay`); then one small panel per top concept,
    its map as a heatmap in its colour over the image (at most 3 small panels a line).

    Parameters
    ----------
    images : (N, H, W, 3) float in [0, 1] (clipped).
    maps : (N, r, H, W) non-negative concept attribution maps at image resolution (NaN and
        negative values are drawn as 0).
    class_name : shown in the title.
    importance : (r,) picks and orders the top concepts; None: concepts 0..r−1 in index order.
    top : how many concepts to show, at most r.
    titles : N image titles; default "image n".
    concept_names : r names; default "concept i".

    Returns
    -------
    Figure with N·(2 + min(top, r)) axes, column by column (image, overlay, small panels).
    """
    images, maps = _checked_images_and_maps(images, maps)
    N, r = images.shape[0], maps.shape[1]
    if top < 1:
        raise ValueError(f"top must be ≥ 1, got {top}")
    if importance is not None:
        importance = _importance(importance, r, "maps")
    order = np.arange(r) if importance is None else _order(importance)
    chosen = order[: min(top, r)]
    if titles is None:
        titles = [f"image {n}" for n in range(N)]
    elif len(titles) != N:
        raise ValueError(f"titles must have one title per image ({N}), got {len(titles)}")
    names = _names(concept_names, r)
    labels = [names[i] if importance is None else f"{names[i]}\nS_T={importance[i]:.2f}" for i in chosen]
    maps = np.clip(np.nan_to_num(maps), 0, None)
    images = np.clip(images, 0, 1)

    fig, gs, lines, per_line = _overlay_grid(N, len(chosen))
    for n in range(N):
        _draw_image_and_overlay(fig, gs[0, n], gs[1, n], images[n], maps[n], chosen, titles[n], first=n == 0)
        _draw_concept_heatmaps(fig, gs[2, n], lines, per_line, images[n], maps[n], chosen, labels)
    fig.suptitle(f"{class_name}: concept attribution maps")
    return fig


# ---------------------------------------------------------------------------------------------
# CRAFT Figure 3: the recursive decomposition
# ---------------------------------------------------------------------------------------------


def _tree_nodes(tree: dict) -> list[tuple[dict, int, float, int | None, np.ndarray]]:
    """(node, depth, x slot, parent position in the list, colour) for every node, parents first.

    Leaves take consecutive slots left to right; a parent sits midway over its first and last
    child. Iterative, so that any depth works.
    """
    if not isinstance(tree, dict):
        raise TypeError(f"tree must be a dict with 'id', 'label' and 'children', got {type(tree).__name__}")
    nodes: list[list] = []
    stack: list[tuple[Any, int, int | None, np.ndarray]] = [(tree, 0, None, np.array([0.85, 0.85, 0.85]))]
    # Depth-first pre-order numbers the nodes; x is filled in afterwards, children before parents.
    while stack:
        node, depth, parent, color = stack.pop()
        if not isinstance(node, dict):
            where = "" if parent is None else f" under node {nodes[parent][0].get('id')!r}"
            raise TypeError(f"tree: every node must be a dict, got {type(node).__name__}{where}")
        children = node.get("children") or []
        if not isinstance(children, list):
            raise TypeError(f"tree: 'children' of node {node.get('id')!r} must be a list")
        me = len(nodes)
        nodes.append([node, depth, 0.0, parent, color])
        for pos in reversed(range(len(children))):
            child = children[pos]
            if depth == 0:
                index = child.get("concept", pos) if isinstance(child, dict) else pos
                child_color = prototype_colour(int(index))
            else:
                child_color = _lighten(color, 0.35)
            stack.append((child, depth + 1, me, child_color))
    kids: dict[int, list[int]] = {}
    for idx, (_, _, _, parent, _) in enumerate(nodes):
        if parent is not None:
            kids.setdefault(parent, []).append(idx)
    slot = 0
    # Pre-order lists parents before children and children left to right, so leaves come in
    # left-to-right order; parents are placed after, deepest first.
    for idx in range(len(nodes)):
        if idx not in kids:
            nodes[idx][2] = float(slot)
            slot += 1
    for idx in sorted(kids, key=lambda i: -nodes[i][1]):
        xs = [nodes[c][2] for c in kids[idx]]
        nodes[idx][2] = (min(xs) + max(xs)) / 2
    return [tuple(n) for n in nodes]


def _tree_thumbnails(crops: dict[str, np.ndarray] | None, nodes: Sequence[tuple]) -> dict[str, list[np.ndarray]]:
    """node id → up to 3 of its crops (H, W, 3), clipped to [0, 1], those holding NaN left out.

    ``crops`` maps node ids to (k, H, W, 3) arrays; every id must be one of ``nodes``.
    """
    crops = dict(crops or {})
    ids = {str(n[0].get("id")) for n in nodes}
    unknown = sorted(set(map(str, crops)) - ids)
    if unknown:
        raise ValueError(f"crops has ids that are not in the tree: {unknown}")
    thumbs: dict[str, list[np.ndarray]] = {}
    for key, arr in crops.items():
        arr = np.asarray(arr, dtype=float)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"crops[{key!r}] must have shape (k, H, W, 3), got {arr.shape}")
        thumbs[str(key)] = [np.clip(c, 0, 1) for c in arr if not _missing(c)][:3]
    return thumbs


# Sizes in inches of a concept tree: each leaf has a slot; a level is a box, the band of
# thumbnails under it (none when no node has any) and a gap.
_SLOT_W, _BOX_W, _BOX_H, _TITLE_H = 1.9, 1.7, 0.62, 0.55
_THUMB = (_BOX_W - 0.1) / 3  # so that 3 thumbnails fill a box's width


@dataclass(frozen=True)
class _TreeGeometry:
    """The size of a concept tree's figure and its levels, in inches (the main axes' data units)."""

    width: float
    height: float
    offset: float  # left margin that centres the slots when the figure is wider than they are
    band: float  # height of a row of thumbnails and its gap, 0 when no node has thumbnails
    level_h: float

    def centre(self, node: tuple) -> tuple[float, float]:
        """The centre (x, y) of a node's box, from its depth and its x slot."""
        return self.offset + (node[2] + 0.5) * _SLOT_W, self.height - _TITLE_H - node[1] * self.level_h - _BOX_H / 2


def _tree_geometry(nodes: Sequence[tuple], thumbs: dict[str, list[np.ndarray]]) -> _TreeGeometry:
    """The geometry of the tree of ``nodes`` (from :func:`_tree_nodes`), with ``thumbs`` or not."""
    band = _THUMB + 0.1 if any(thumbs.values()) else 0.0
    level_h = _BOX_H + band + 0.5
    n_slots = 1 + max(n[2] for n in nodes)
    depth = 1 + max(n[1] for n in nodes)
    width = max(n_slots * _SLOT_W, 3.5)
    height = _TITLE_H + depth * level_h
    offset = (width - n_slots * _SLOT_W) / 2
    return _TreeGeometry(width=width, height=height, offset=offset, band=band, level_h=level_h)


def _draw_tree_edges(ax: Axes, nodes: Sequence[tuple], geo: _TreeGeometry, thumbs: dict[str, list[np.ndarray]]) -> None:
    """An elbow from under each parent's box (and its thumbnails) to the top of each child's box."""
    for node in nodes:
        if node[3] is None:
            continue
        parent = nodes[node[3]]
        (px, py), (cx, cy) = geo.centre(parent), geo.centre(node)
        start = py - _BOX_H / 2 - (geo.band if thumbs.get(str(parent[0].get("id"))) else 0.0)
        end = cy + _BOX_H / 2
        ax.plot([px, px, cx, cx], [start, (start + end) / 2, (start + end) / 2, end], color="0.45", linewidth=1.0, zorder=1)


def _draw_tree_node(fig: Figure, ax: Axes, node: tuple, geo: _TreeGeometry, row: Sequence[np.ndarray]) -> None:
    """One node: its box in its colour, its label and "layer · S_T", its thumbnails ``row`` under it."""
    data, _, _, _, color = node
    x, y = geo.centre(node)
    box = FancyBboxPatch((x - _BOX_W / 2, y - _BOX_H / 2), _BOX_W, _BOX_H, boxstyle="round,pad=0,rounding_size=0.08")
    box.set(facecolor=color, edgecolor="0.3", linewidth=0.8, zorder=2)
    ax.add_patch(box)
    label = str(data.get("label", data.get("id", "")))
    if len(label) > 24:
        label = label[:23] + "…"
    details = []
    if data.get("layer") is not None:
        details.append(str(data["layer"]))
    if data.get("importance") is not None:
        details.append(f"S_T={float(data['importance']):.2f}")
    ink = _ink(color)
    ax.text(x, y + (0.1 if details else 0.0), label, ha="center", va="center", fontsize=8, fontweight="bold", color=ink, zorder=3)
    if details:
        ax.text(x, y - 0.14, " · ".join(details), ha="center", va="center", fontsize=7, color=ink, zorder=3)
    start = x - (len(row) * _THUMB + (len(row) - 1) * 0.05) / 2
    for s, img in enumerate(row):
        x0, y0 = start + s * (_THUMB + 0.05), y - _BOX_H / 2 - 0.05 - _THUMB
        tax = fig.add_axes((x0 / geo.width, y0 / geo.height, _THUMB / geo.width, _THUMB / geo.height))
        tax.imshow(img, aspect="auto")
        _bare(tax, color, width=1.5)


def concept_tree(
    tree: dict,
    *,
    class_name: str,
    crops: dict[str, np.ndarray] | None = None,
) -> Figure:
    """A tree of concepts and sub-concepts, levels top to bottom (CRAFT Figure 3).

    Parameters
    ----------
    tree : ``{"id": "root", "label": str, "children": [node, ...]}``, each node
        ``{"id": str, "label": str, "importance": float, "layer": str, "children": [...]}``;
        "importance", "layer" and "children" may be left out. A top-level node takes the colour
        of ``node.get("concept", its position)``; a sub-concept a lighter shade of its parent's.
    class_name : shown in the title.
    crops : node id → (k, H, W, 3) float in [0, 1]; up to 3 crops (those without NaN) are drawn
        under the node. Ids absent from the tree raise ValueError.

    Returns
    -------
    Figure whose first axes holds the boxes and edges; one more axes per thumbnail.
    """
    nodes = _tree_nodes(tree)
    thumbs = _tree_thumbnails(crops, nodes)
    geo = _tree_geometry(nodes, thumbs)
    fig = Figure(figsize=(geo.width, geo.height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, geo.width)
    ax.set_ylim(0, geo.height)
    ax.axis("off")
    _draw_tree_edges(ax, nodes, geo, thumbs)
    for node in nodes:
        _draw_tree_node(fig, ax, node, geo, thumbs.get(str(node[0].get("id")), []))
    fig.suptitle(f"{class_name}: concepts and sub-concepts", y=1 - 0.15 / geo.height, va="top")
    return fig


# ---------------------------------------------------------------------------------------------
# CRAFT Figure 5: fidelity in concept space
# ---------------------------------------------------------------------------------------------


_FIDELITY_PANELS = ("deletion", "insertion")


def _checked_curves(curves: Any, auc: dict[str, dict[str, float]] | None) -> dict[str, dict[str, np.ndarray]]:
    """``curves`` with every curve as a float array (r+1,); ValueError if it or ``auc`` is malformed."""
    if not isinstance(curves, dict) or not curves:
        raise ValueError("curves must map at least one ranking name to its curves")
    extra = sorted(set(auc or {}) - set(curves))
    if extra:
        raise ValueError(f"auc names rankings that are not in curves: {extra}")
    checked: dict[str, dict[str, np.ndarray]] = {}
    for name, pair in curves.items():
        wrong = sorted(set(pair) - set(_FIDELITY_PANELS))
        if wrong:
            raise ValueError(f"curves[{name!r}] may only have keys {_FIDELITY_PANELS}, got {wrong}")
        checked[name] = {}
        for panel, values in pair.items():
            arr = np.asarray(values, dtype=float)
            if arr.ndim != 1 or arr.shape[0] < 2:
                raise ValueError(f"curves[{name!r}][{panel!r}] must be 1-D over k = 0..r (r ≥ 1), got shape {arr.shape}")
            checked[name][panel] = arr
    return checked


def _draw_fidelity_panel(
    ax: Axes, panel: str, better: str, curves: dict[str, dict[str, np.ndarray]], auc: dict[str, dict[str, float]]
) -> None:
    """One panel (``panel`` is "deletion" or "insertion"): a line per ranking that has that curve.

    The c-th ranking of ``curves`` is drawn in colour ``C{c}`` whether or not it has this curve,
    so that it keeps its colour in both panels.
    """
    for c, (name, pair) in enumerate(curves.items()):
        if panel not in pair:
            continue
        y = pair[panel]
        label = name
        if panel in auc.get(name, {}):
            label = f"{name} (AUC={float(auc[name][panel]):.3f})"
        ax.plot(np.arange(len(y)) / (len(y) - 1), y, marker="o", markersize=3, color=f"C{c}", label=label)
    ax.set_title(f"{panel} ({better} is better)")
    ax.set_xlabel(f"fraction of concepts {'removed' if panel == 'deletion' else 'added'} (k / r)")
    ax.set_xlim(-0.02, 1.02)
    if ax.lines:
        ax.legend(fontsize=8)


def fidelity_curves(
    curves: dict[str, dict[str, np.ndarray]],
    *,
    auc: dict[str, dict[str, float]] | None = None,
    title: str = "",
) -> Figure:
    """Deletion (left) and insertion (right) curves, one line per ranking of the concepts.

    Parameters
    ----------
    curves : ranking name → {"deletion": (r+1,), "insertion": (r+1,)}: the model's score with the
        k = 0..r first concepts of that ranking removed (deletion) or kept alone (insertion).
        Either key may be left out; x is k / r.
    auc : ranking name → {"deletion": float, "insertion": float}, shown in the legend.
    title : figure title.

    Returns
    -------
    Figure with two axes: deletion (lower is better), insertion (higher is better). A ranking
    has the same colour in both.
    """
    checked = _checked_curves(curves, auc)
    auc = auc or {}
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for ax, panel, better in zip(axes, _FIDELITY_PANELS, ("lower", "higher")):
        _draw_fidelity_panel(ax, panel, better, checked, auc)
    axes[0].set_ylabel("model score")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
