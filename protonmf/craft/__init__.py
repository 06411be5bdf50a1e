"""CRAFT: concepts by NMF on crops and their Sobol importance (:mod:`~protonmf.craft.concepts`), concept
attribution maps (:mod:`~protonmf.craft.maps`), fidelity (:mod:`~protonmf.craft.fidelity`), the measurements of
§4.3 (:mod:`~protonmf.craft.evaluation`) and the concept set artifact (:mod:`~protonmf.craft.artifact`).

The names below are imported on first use (importing the package costs nothing: the run's config
imports :mod:`~protonmf.craft.settings`, and a ProtoNMF run needs none of CRAFT's machinery).
"""

from protonmf.lazy import lazy_exports

#: Each public name and the module that defines it.
_HOMES = {
    "Bank": "concepts",
    "ClassConcepts": "concepts",
    "ConceptSet": "artifact",
    "CraftSettings": "settings",
    "MAP_METHODS": "evaluation",
    "METHODS": "maps",
    "TOP_CROP_SCHEMA": "artifact",
    "class_concepts": "concepts",
    "class_tensors": "artifact",
    "compare_rankings": "evaluation",
    "concept_fidelity": "fidelity",
    "concept_maps": "maps",
    "concept_values": "maps",
    "crop_images": "concepts",
    "crops_at": "concepts",
    "directional_derivatives": "fidelity",
    "encode": "concepts",
    "encode_positions": "concepts",
    "evaluate_class": "evaluation",
    "extract_concepts": "concepts",
    "maps_from_features": "maps",
    "pool": "concepts",
    "pooled_activations": "concepts",
    "pooled_head": "concepts",
    "predicted_val_images": "evaluation",
    "rank_and_measure": "evaluation",
    "split_class_tensors": "artifact",
    "summarize_concepts": "evaluation",
    "tcav_ranking": "fidelity",
    "top_crops_table": "artifact",
    "unit_concepts": "concepts",
}

__getattr__, __all__ = lazy_exports(__name__, _HOMES)
