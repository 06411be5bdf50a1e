"""The paper's measurements of a prototype model: held-out accuracy and exactness
(:mod:`~protonmf.evaluation.held_out`, :mod:`~protonmf.evaluation.published`), the reconstruction study
(:mod:`~protonmf.evaluation.reconstruction`, :mod:`~protonmf.evaluation.baselines`), part localization and
consistency / stability (:mod:`~protonmf.evaluation.localization`, :mod:`~protonmf.evaluation.interpretability`).

The names below are imported on first use.
"""

from protonmf.lazy import lazy_exports

#: Each public name and the module that defines it.
_HOMES = {
    "BOX_HALF_SIZE_224": "interpretability",
    "HeldOutStats": "held_out",
    "NOISE_CLIP": "interpretability",
    "NOISE_STD": "interpretability",
    "accumulate_held_out": "held_out",
    "basis_error": "baselines",
    "box_half_size": "interpretability",
    "class_localization": "localization",
    "class_localization_of_rows": "localization",
    "consistency": "interpretability",
    "evaluate_model": "held_out",
    "evaluate_published_model": "published",
    "finish_evaluation": "published",
    "held_out_shards": "held_out",
    "localization_rows": "localization",
    "matched_cosine": "reconstruction",
    "merge_held_out": "held_out",
    "noise_seeds": "interpretability",
    "part_localization": "localization",
    "part_localization_of_rows": "localization",
    "part_vectors": "interpretability",
    "patch_prototypes": "baselines",
    "peak_locations": "interpretability",
    "perturb": "interpretability",
    "reconstruction_study": "reconstruction",
    "stability": "interpretability",
    "summarize_held_out": "held_out",
}

__getattr__, __all__ = lazy_exports(__name__, _HOMES)
