"""The paper's measurements of a prototype model: held-out accuracy and exactness
(:mod:`~protonmf.evaluation.held_out`, :mod:`~protonmf.evaluation.published`), the reconstruction study
(:mod:`~protonmf.evaluation.reconstruction`, :mod:`~protonmf.evaluation.baselines`), part localization and
consistency / stability (:mod:`~protonmf.evaluation.localization`, :mod:`~protonmf.evaluation.interpretability`)."""

from protonmf.evaluation.held_out import (  # noqa: F401
    HeldOutStats, accumulate_held_out, evaluate_model, held_out_shards, merge_held_out, summarize_held_out,
)
from protonmf.evaluation.published import evaluate_published_model, finish_evaluation  # noqa: F401
from protonmf.evaluation.reconstruction import matched_cosine, reconstruction_study  # noqa: F401
from protonmf.evaluation.baselines import basis_error, patch_prototypes  # noqa: F401
from protonmf.evaluation.localization import (  # noqa: F401
    class_localization, class_localization_of_rows, localization_rows, part_localization,
    part_localization_of_rows,
)
from protonmf.evaluation.interpretability import (  # noqa: F401
    BOX_HALF_SIZE_224, NOISE_CLIP, NOISE_STD, box_half_size, consistency, noise_seeds, part_vectors,
    peak_locations, perturb, stability,
)

__all__ = [
    "BOX_HALF_SIZE_224",
    "HeldOutStats",
    "NOISE_CLIP",
    "NOISE_STD",
    "accumulate_held_out",
    "basis_error",
    "box_half_size",
    "class_localization",
    "class_localization_of_rows",
    "consistency",
    "evaluate_model",
    "evaluate_published_model",
    "finish_evaluation",
    "held_out_shards",
    "localization_rows",
    "matched_cosine",
    "merge_held_out",
    "noise_seeds",
    "part_localization",
    "part_localization_of_rows",
    "part_vectors",
    "patch_prototypes",
    "peak_locations",
    "perturb",
    "reconstruction_study",
    "stability",
    "summarize_held_out",
]
