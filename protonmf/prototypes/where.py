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

__all__ = ["WHERE", "Where", "codes_of", "prototype_codes"]

Where = Literal["codes", "presence"]
#: The definitions of "where prototype i is", the default first.
WHERE: tuple[str, ...] = ("codes", "presence")


def codes_of(F: Tensor, vectors: Tensor) -> Tensor:
    """E = argmin_{E ≥ 0} ||F⁺ − E vectors||² row by row: (..., n, D) against (..., p, D) → (..., n, p)."""
    return nnls(F.clamp_min(0), vectors)


def prototype_codes(F: Tensor, B: Tensor, *, block_rows: int = 8192) -> Tensor:
    """Where each NMF prototype is (the module's definition), row block by row block.

    Parameters
    ----------
    F : (..., n, D) features, any float dtype (half precision is solved in float32), on B's device
        or streamed to it a block at a time.
    B : (..., p, D) the NMF prototypes of each leading index (a class, or an image's class).
    block_rows : rows solved at once; bounds the working memory.

    Returns
    -------
    E : (..., n, p) float32 (float64 if F or B is), on B's device; zero rows of F (a padded class)
        get zero codes.
    """
    dtype = torch.float64 if torch.float64 in (F.dtype, B.dtype) else torch.float32
    B = B.to(dtype)
    n = F.shape[-2]
    if n <= block_rows:
        return codes_of(F.to(device=B.device, dtype=dtype), B)
    blocks = [codes_of(F[..., start : start + block_rows, :].to(device=B.device, dtype=dtype), B)
              for start in range(0, n, block_rows)]
    return torch.cat(blocks, dim=-2)
