"""ProtoNMF: fitting prototypes per class (:mod:`~protonmf.prototypes.fit`), the exact prototype model
(:mod:`~protonmf.prototypes.model`), its gallery (:mod:`~protonmf.prototypes.gallery`) and explanations of
single images as numbers (:mod:`~protonmf.prototypes.explain_images`)."""

from protonmf.prototypes.fit import (  # noqa: F401
    ClassPrototypes, fit_classes, fit_classes_and_codes, fit_prototypes, fit_prototypes_sweep, fit_settings,
    head_from_prototypes, residual_only, stack_classes,
)
from protonmf.prototypes.model import ArtifactError, Explanation, PrototypeModel  # noqa: F401
from protonmf.prototypes.gallery import (  # noqa: F401
    GALLERY_SCHEMA, PATCH_MAX_SIDE, TopCodes, cell_box, class_patches, gallery_table, patch_picture,
    read_gallery, top_codes, write_gallery,
)
from protonmf.prototypes.explain_images import class_key, describe, gallery_entries, parse_interventions  # noqa: F401

__all__ = [
    "ArtifactError",
    "ClassPrototypes",
    "Explanation",
    "GALLERY_SCHEMA",
    "PATCH_MAX_SIDE",
    "PrototypeModel",
    "TopCodes",
    "cell_box",
    "class_key",
    "class_patches",
    "describe",
    "fit_classes",
    "fit_classes_and_codes",
    "fit_prototypes",
    "fit_prototypes_sweep",
    "fit_settings",
    "gallery_entries",
    "head_from_prototypes",
    "gallery_table",
    "parse_interventions",
    "patch_picture",
    "read_gallery",
    "residual_only",
    "stack_classes",
    "top_codes",
    "write_gallery",
]
