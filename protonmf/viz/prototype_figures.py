"""Pictures a person looks at (matplotlib, Agg): prototype areas over images, errors against p.

- :func:`prototype_overlay`: each prototype's area in its own colour (ProtoNMF Figures 2–4): a
  pixel takes the colour of the prototype with the largest heatmap there (each heatmap scaled to
  its own maximum), drawn where that prototype is at least ``threshold`` of its maximum.
- :func:`presence_overlay`: one prototype's heatmap in its own colour over a grey copy of the image;
  :func:`presence_strip` for n images with its contribution to each, :func:`patch_strip` its
  gallery (the training patches where it is most present, its cell outlined in its colour).
- :func:`explanation_figure`: one image, the residual heatmap, a bar per prototype contribution,
  and per prototype a row: its heatmap, contribution and gallery (Figure 3 / Figure 9).
- :func:`error_curves`: feature and head reconstruction errors against p (Figure 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
import matplotlib.colors
import matplotlib.patches

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from protonmf.viz.png import LABEL_PT  # noqa: E402

__all__ = ["PROTOTYPE_COLORS", "colour_hex", "draw_patches", "error_curves", "explanation_figure", "patch_strip",
           "presence_overlay", "presence_strip", "prototype_colour", "prototype_overlay"]

PROTOTYPE_COLORS = np.array(plt.get_cmap("tab10").colors)  # prototype i has colour i % 10
#: The residual prototype's colour: its bar, its heatmap, its panel (one scheme for every heatmap:
#: its owner's colour over a grey copy of the image, :func:`presence_overlay`).
RESIDUAL_COLOUR = np.array([0.25, 0.25, 0.25])


def prototype_overlay(image: np.ndarray, heatmaps: np.ndarray, *, threshold: float = 0.3, alpha: float = 0.55) -> np.ndarray:
    """Blend each prototype's area, in its own colour, over an image.

    Parameters
    ----------
    image : (H, W, 3) float in [0, 1].
    heatmaps : (p, H, W) non-negative.

    Returns
    -------
    (H, W, 3) float in [0, 1].
    """
    scaled = heatmaps / np.maximum(heatmaps.reshape(len(heatmaps), -1).max(1), 1e-12)[:, None, None]
    winner = scaled.argmax(0)
    strength = scaled.max(0)
    colour = prototype_colour(winner)  # (H, W, 3)
    weight = (alpha * (strength >= threshold) * np.clip(strength, 0, 1))[..., None]
    return np.clip((1 - weight) * image + weight * colour, 0, 1)


def prototype_colour(i: int | np.ndarray) -> np.ndarray:
    """Prototype i's colour (RGB in [0, 1]; for an array of indices, an array of colours): its bar,
    its heatmap, its legend entry, its patches."""
    return PROTOTYPE_COLORS[i % len(PROTOTYPE_COLORS)]


def colour_hex(i: int) -> str:
    return matplotlib.colors.to_hex(prototype_colour(i))


def presence_overlay(image: np.ndarray, heatmap: np.ndarray, colour: Sequence[float], *, vmax: float,
                     alpha: float = 0.85) -> np.ndarray:
    """One prototype's heatmap in its own colour over a dimmed grey copy of the image.

    A pixel is ``(1 − t) · grey + t · colour`` with t = ``alpha`` · clip(heatmap / vmax, 0, 1):
    where the prototype is at ``vmax`` it is (nearly) its colour, where it is absent the image shows
    in grey, so the colour is never confused with the image's own.

    Parameters
    ----------
    image : (H, W, 3) float in [0, 1]. heatmap : (H, W) non-negative. vmax : the heatmap value drawn at full strength.
    """
    grey = 0.35 + 0.5 * image.mean(-1, keepdims=True)  # dimmed, so that a colour at full strength stands out
    t = (alpha * np.clip(heatmap / max(float(vmax), 1e-12), 0, 1))[..., None]
    return np.clip((1 - t) * grey + t * np.asarray(colour)[None, None, :3], 0, 1)


def residual_overlay(image: np.ndarray, heatmap: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """The residual prototype's heatmap as every prototype's is drawn (:func:`presence_overlay`),
    in :data:`RESIDUAL_COLOUR`; ``vmax`` defaults to the heatmap's own largest value."""
    top = float(np.max(heatmap)) if vmax is None else vmax
    return presence_overlay(image, heatmap, RESIDUAL_COLOUR, vmax=top if top > 0 else 1.0)


def draw_patches(axes: Sequence[Any], patches: Sequence[tuple[np.ndarray | None, tuple[float, float, float, float], float]],
                 colour: Sequence[float]) -> None:
    """A prototype's gallery (:mod:`protonmf.prototypes.gallery`) on ``axes``, one patch each: the
    picture with its cell outlined in the prototype's colour, E above it; spare axes are blanked."""
    for j, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if j >= len(patches) or patches[j][0] is None:
            ax.axis("off")
            continue
        picture, (x0, y0, x1, y1), score = patches[j]
        ax.imshow(picture, interpolation="nearest")
        ax.add_patch(matplotlib.patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                                  edgecolor=colour, linewidth=2))
        ax.set_title(f"E = {score:.3g}", fontsize=LABEL_PT)
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(2)


def presence_strip(images: np.ndarray, heatmaps: np.ndarray, colour: Sequence[float], contributions: Sequence[float]) -> Figure:
    """One prototype in n images: its heatmap in its colour (scaled to its largest value over these
    images, so strengths compare), and its contribution to each image's logit above it.

    Parameters
    ----------
    images : (n, H, W, 3) in [0, 1]. heatmaps : (n, H, W). contributions : n values.
    """
    n = len(images)
    vmax = float(heatmaps.max()) if heatmaps.size else 1.0
    fig, axes = plt.subplots(1, n, figsize=(1.25 * n, 1.45), squeeze=False)
    for j, ax in enumerate(axes[0]):
        ax.imshow(presence_overlay(images[j], heatmaps[j], colour, vmax=vmax))
        ax.set_title(f"{contributions[j]:+.3g}", fontsize=LABEL_PT)
        ax.axis("off")
    fig.tight_layout(pad=0.3)
    return fig


def patch_strip(patches: Sequence[tuple[np.ndarray | None, tuple[float, float, float, float], float]], colour: Sequence[float],
                k: int) -> Figure:
    """A prototype's ``k`` gallery patches in a row (see :func:`draw_patches`)."""
    fig, axes = plt.subplots(1, max(k, 1), figsize=(1.1 * max(k, 1), 1.45), squeeze=False)
    draw_patches(axes[0], patches, colour)
    fig.tight_layout(pad=0.3)
    return fig


def explanation_figure(
    image: np.ndarray,
    heatmaps: np.ndarray,
    residual_heatmap: np.ndarray,
    contributions: Sequence[float],
    *,
    title: str,
    residual: float | None = None,
    coefficients: Sequence[float] | None = None,
    patches: Sequence[Sequence[tuple[np.ndarray | None, tuple[float, float, float, float], float]]] | None = None,
) -> Figure:
    """One explained image (Figure 3 / 9): the image, the residual prototype's heatmap and each
    prototype's contribution to the logit as a bar in its colour; then one row per prototype: its
    heatmap in its colour, its contribution (and coefficient a_i), and its gallery patches.

    Parameters
    ----------
    image : (H, W, 3) in [0, 1]. heatmaps : (p, H, W). residual_heatmap : (H, W).
    contributions : p values. residual : the residual's own share of the logit (None: spread over the prototypes).
    coefficients : p values a_i, or None. patches : per prototype, its gallery as (picture, cell box, E), or None.
    """
    p = len(contributions)
    k = max((len(g) for g in patches), default=0) if patches else 0
    cols = 2 + max(k, 3)
    fig = plt.figure(figsize=(1.45 * cols, 1.75 * (1 + p) + 0.6), layout="constrained")
    grid = fig.add_gridspec(1 + p, cols)
    _draw_summary_row(fig, grid[0, :], image, residual_heatmap, contributions, residual, cols)
    vmax = float(heatmaps.max()) if heatmaps.size else 1.0  # one scale for all: strengths compare across prototypes
    rows = [_draw_prototype_row(fig, grid, i, image, heatmaps[i], vmax, contributions[i],
                                None if coefficients is None else coefficients[i], patches[i] if patches else None, k)
            for i in range(p)]
    fig.suptitle(title, fontsize=11)
    if patches and p and k:
        heatmap_ax, gallery_axes = rows[0]
        _caption_gallery(fig, heatmap_ax, gallery_axes[0])
    return fig


def _draw_summary_row(fig: Figure, row: Any, image: np.ndarray, residual_heatmap: np.ndarray,
                      contributions: Sequence[float], residual: float | None, cols: int) -> None:
    """The explanation's first row: the image, the residual prototype's heatmap over it, and each
    prototype's contribution to the logit as a bar in its colour (the residual's in grey)."""
    p = len(contributions)
    top = row.subgridspec(1, 3, width_ratios=[1, 1, cols - 2.4])  # its own margins: the bar labels widen no column below
    ax = fig.add_subplot(top[0, 0])
    ax.imshow(image)
    ax.set_title("image", fontsize=9)
    ax.axis("off")
    ax = fig.add_subplot(top[0, 1])
    ax.imshow(residual_overlay(image, residual_heatmap))
    ax.set_title("residual prototype", fontsize=9)
    ax.axis("off")
    ax = fig.add_subplot(top[0, 2])
    labels = [f"prototype {i}" for i in range(p)] + (["residual"] if residual is not None else [])
    values = list(contributions) + ([residual] if residual is not None else [])
    colours = [prototype_colour(i) for i in range(p)] + ([RESIDUAL_COLOUR] if residual is not None else [])
    ax.barh(labels, values, color=colours)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.tick_params(labelsize=8)
    ax.set_title("contribution to the logit", fontsize=9)


def _draw_prototype_row(fig: Figure, grid: Any, i: int, image: np.ndarray, heatmap: np.ndarray, vmax: float,
                        contribution: float, coefficient: float | None,
                        patches: Sequence[tuple[np.ndarray | None, tuple[float, float, float, float], float]] | None,
                        k: int) -> tuple[Any, list[Any]]:
    """Prototype i's row of an explanation (row 1 + i of ``grid``): its heatmap (H, W) in its colour over the image, labelled
    with its contribution (and coefficient a_i), then its ``k`` gallery patches if given.
    Returns the heatmap's axes and the gallery's."""
    colour = prototype_colour(i)
    ax = fig.add_subplot(grid[1 + i, 0])
    ax.imshow(presence_overlay(image, heatmap, colour, vmax=vmax))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)
    coef = "" if coefficient is None else f"\na = {coefficient:.3g}"
    ax.set_ylabel(f"prototype {i}\n{contribution:+.3g}{coef}", fontsize=9, color=colour, fontweight="bold")
    if i == 0:
        ax.set_title("where it is here", fontsize=9)
    gallery = []
    if patches:
        gallery = [fig.add_subplot(grid[1 + i, 1 + j]) for j in range(k)]
        draw_patches(gallery, patches, colour)
    return ax, gallery


def _caption_gallery(fig: Figure, first_heatmap_ax: Any, first_gallery_ax: Any) -> None:
    """The galleries' caption, placed after the layout, above the first row's patch titles."""
    fig.draw_without_rendering()
    fig.set_layout_engine("none")  # keep the positions the layout found
    fig.text(first_gallery_ax.get_position().x0, first_heatmap_ax.get_position().y1 + 0.22 / fig.get_figheight(),
             "where the same map is largest in training (the gallery)", fontsize=9)


def error_curves(p_values: Sequence[int], errors: dict[str, Sequence[tuple[float, float]]]) -> Figure:
    """Mean ± std of reconstruction errors against p; ``errors`` maps a label to (mean, std) per p."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, values in errors.items():
        mean = np.array([v[0] for v in values])
        std = np.array([v[1] for v in values])
        ax.errorbar(p_values, mean, yerr=std, marker="o", capsize=3, label=label)
    ax.set_xlabel("prototypes per class (p)")
    ax.set_ylabel("relative reconstruction error")
    ax.set_xticks(list(p_values))
    ax.legend()
    fig.tight_layout()
    return fig
