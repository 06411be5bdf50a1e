"""Pictures a person looks at (matplotlib, Agg): prototype areas over images, errors against p.

- :func:`prototype_overlay`: each prototype's area in its own colour (ProtoNMF Figures 2–4): a
  pixel takes the colour of the prototype with the largest heatmap there (each heatmap scaled to
  its own maximum), drawn where that prototype is at least ``threshold`` of its maximum.
- :func:`explanation_figure`: one image, its overlay, the residual heatmap, and a bar per
  prototype contribution (Figure 3 / Figure 9).
- :func:`error_curves`: feature and head reconstruction errors against p (Figure 5).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["PROTOTYPE_COLORS", "error_curves", "explanation_figure", "prototype_overlay"]

PROTOTYPE_COLORS = np.array(plt.get_cmap("tab10").colors)  # prototype i has colour i % 10


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
    colour = PROTOTYPE_COLORS[winner % len(PROTOTYPE_COLORS)]
    weight = (alpha * (strength >= threshold) * np.clip(strength, 0, 1))[..., None]
    return np.clip((1 - weight) * image + weight * colour, 0, 1)


def explanation_figure(
    image: np.ndarray,
    heatmaps: np.ndarray,
    residual_heatmap: np.ndarray,
    contributions: Sequence[float],
    *,
    title: str,
    residual: float | None = None,
) -> Figure:
    """Image, prototype areas, residual heatmap, and the contribution of each prototype to the logit."""
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4), gridspec_kw={"width_ratios": [1, 1, 1, 1.3]})
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(prototype_overlay(image, heatmaps))
    axes[1].set_title("prototype areas")
    axes[2].imshow(image)
    axes[2].imshow(residual_heatmap, cmap="magma", alpha=0.6)
    axes[2].set_title("residual prototype")
    for ax in axes[:3]:
        ax.axis("off")
    p = len(contributions)
    labels = [f"proto {i}" for i in range(p)] + (["residual"] if residual is not None else [])
    values = list(contributions) + ([residual] if residual is not None else [])
    colours = [PROTOTYPE_COLORS[i % 10] for i in range(p)] + ([(0.5, 0.5, 0.5)] if residual is not None else [])
    axes[3].barh(labels, values, color=colours)
    axes[3].invert_yaxis()
    axes[3].axvline(0, color="black", linewidth=0.8)
    axes[3].set_title("contribution to the logit")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


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
