"""Where a prototype is: the one definition behind every picture and score of a prototype.

For the features F (n, D) of an image (its h·w positions) and a class's NMF prototypes B (p, D),
prototype i is where the image's own non-negative codes put it:

    E = argmin_{E ≥ 0} ||F⁺ − E B||²        (the E of eq. 1 for fixed B, solved to its optimum)

F⁺ being F with negative entries set to 0 (§3.1). This is what E is for a training image once the
NMF has converged, so the same map serves:

- the heatmaps of :meth:`~protonmf.prototypes.model.PrototypeModel.explain` (``protonmf explain``,
  the report, the atlas) and the evaluation's localization, consistency and stability;
- the gallery, the top of this map over the class's training rows
  (:func:`~protonmf.prototypes.fit.fit_classes_and_codes`: one solve on the features the fit already
  holds, no pass over the images);
- the residual's heatmap, drawn on its own (eq. 6 with these codes).

``"presence"`` is the paper's eq. 9 instead: codes against the augmented prototypes b′ᵢ, which
carry a share of the residual prototype. It stays available by that name (``where="presence"``);
it is not the default picture, because a residual share can move the map off the part the NMF
found (and off the gallery).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from protonmf.nnls import nnls

__all__ = ["WHERE", "Where", "codes_by_class", "codes_of", "prototype_codes"]

Where = Literal["codes", "presence"]
#: The definitions of "where prototype i is", the default first.
WHERE: tuple[str, ...] = ("codes", "presence")


def codes_of(F: Tensor, vectors: Tensor, init: Tensor | None = None) -> Tensor:
    """E = argmin_{E ≥ 0} ||F⁺ − E vectors||² row by row: (..., n, D) against (..., p, D) → (..., n, p).

    Solved exactly (:func:`~protonmf.nnls.nnls`, all active sets); from ``init`` (..., n, p), codes
    near the optimum, by coordinate descent to the same optimum (KKT within 1e-7 of max |F⁺ vectorsᵀ|).
    """
    if init is None:
        return nnls(F.clamp_min(0), vectors)
    return nnls(F.clamp_min(0), vectors, method="cd", init=init)


def codes_by_class(F: Tensor, vectors: Tensor, target: Tensor) -> Tensor:
    """:func:`codes_of` for images of several classes: image b's rows F[b] (n, D) against the
    vectors of its class ``target[b]`` (``vectors`` (K, p, D)), solved one class at a time, so
    each class's 2^p active sets are factorized once for all its images, not once per image.

    Returns (B, n, p), in F's and vectors' common dtype.
    """
    Bsz, n, D = F.shape
    out = None
    for c in torch.unique(target).tolist():
        sel = (target == c).nonzero().flatten()
        codes = codes_of(F[sel].reshape(-1, D), vectors[c]).reshape(len(sel), n, -1)
        if out is None:
            out = codes.new_empty(Bsz, n, codes.shape[-1])
        out[sel] = codes
    return out if out is not None else F.new_empty(0, n, vectors.shape[-2])


def prototype_codes(F: Tensor, B: Tensor, *, init: Tensor | None = None, block_rows: int = 1024) -> Tensor:
    """Where each NMF prototype is (the module's definition), row block by row block.

    Parameters
    ----------
    F : (..., n, D) features, any float dtype, on B's device or streamed to it a block at a time;
        solved in float64, as :meth:`~protonmf.prototypes.model.PrototypeModel.explain` solves its
        heatmaps (in float32 the active sets of nearly tied rows can come out differently).
    B : (..., p, D) the NMF prototypes of each leading index (a class, or an image's class).
    init : (..., n, p) codes near the optimum to start from, e.g. the E the NMF ended with (a fit's
        gallery: a few coordinate sweeps instead of the 2^p active sets, the same optimum).
    block_rows : rows solved at once; bounds the working memory.

    Returns
    -------
    E : (..., n, p) float64, on B's device; zero rows of F (a padded class) get zero codes.
    """
    B = B.to(torch.float64)
    blocks = [codes_of(F[..., rows, :].to(B.device, torch.float64), B,
                       None if init is None else init[..., rows, :].to(B.device, torch.float64))
              for rows in (slice(s, s + block_rows) for s in range(0, F.shape[-2], block_rows))]
    return torch.cat(blocks, dim=-2) if blocks else B.new_zeros(*F.shape[:-1], B.shape[-2])
