"""How CRAFT extracts concepts: one schema, validated by pydantic, that the run config extends.

:class:`CraftSettings` is the method's knobs; the ``craft`` section of a run's config
(:class:`protonmf.config.CraftConfig`) is these plus what a run needs around them (how many
images, classes per task, figures), so the two can never disagree.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CraftSettings"]


class CraftSettings(BaseModel):
    """How concepts are extracted (CRAFT §3)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_concepts: int = Field(10, ge=1)
    crop: int = Field(64, ge=1)  # crop side in pixels (of the preprocessed image)
    stride: int | None = Field(None, ge=1)  # grid crops every stride pixels (default: crop, no overlap)
    n_random: int = Field(0, ge=0)  # > 0: that many random crops per image instead of a grid
    n_design: int = Field(32, ge=2)  # Sobol design size: n_design·(r + 2) masks per image
    sub_layers: tuple[str, ...] = ()  # recursion: one earlier layer per level of the tree
    sub_concepts: int = Field(3, ge=1)  # concepts per sub-bank
    recurse: int = Field(2, ge=0)  # concepts of each bank decomposed at the next level (the most important)
    percentile: float = Field(90.0, gt=0, lt=100)  # crops above this percentile of a coefficient are decomposed (§3.2)
    max_iter: int = Field(200, ge=0)
    tol: float = Field(1e-4, ge=0)
    seed: int = 0
