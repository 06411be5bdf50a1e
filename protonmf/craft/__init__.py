"""CRAFT: concepts by NMF on crops and their Sobol importance (:mod:`~protonmf.craft.concepts`), concept
attribution maps (:mod:`~protonmf.craft.maps`), fidelity (:mod:`~protonmf.craft.fidelity`), the measurements of
§4.3 (:mod:`~protonmf.craft.evaluation`) and the concept set artifact (:mod:`~protonmf.craft.artifact`)."""

from protonmf.craft.settings import CraftSettings  # noqa: F401
from protonmf.craft.concepts import (  # noqa: F401
    Bank, ClassConcepts, class_concepts, crop_images, crops_at, encode, encode_positions, extract_concepts,
    pool, pooled_activations, pooled_head, unit_concepts,
)
from protonmf.craft.maps import METHODS, concept_maps, concept_values, maps_from_features  # noqa: F401
from protonmf.craft.fidelity import concept_fidelity, directional_derivatives, tcav_ranking  # noqa: F401
from protonmf.craft.evaluation import (  # noqa: F401
    MAP_METHODS, compare_rankings, evaluate_class, predicted_val_images, rank_and_measure, summarize_concepts,
)
from protonmf.craft.artifact import ConceptSet, TOP_CROP_SCHEMA, class_tensors, split_class_tensors, top_crops_table  # noqa: F401

__all__ = [
    "Bank",
    "ClassConcepts",
    "ConceptSet",
    "CraftSettings",
    "MAP_METHODS",
    "METHODS",
    "TOP_CROP_SCHEMA",
    "class_concepts",
    "class_tensors",
    "compare_rankings",
    "concept_fidelity",
    "concept_maps",
    "concept_values",
    "crop_images",
    "crops_at",
    "directional_derivatives",
    "encode",
    "encode_positions",
    "evaluate_class",
    "extract_concepts",
    "maps_from_features",
    "pool",
    "pooled_activations",
    "pooled_head",
    "predicted_val_images",
    "rank_and_measure",
    "split_class_tensors",
    "summarize_concepts",
    "tcav_ranking",
    "top_crops_table",
    "unit_concepts",
]
