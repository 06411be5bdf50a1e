"""protonmf: turn a trained image classifier into an exact, interpretable prototype model.

The core library: algorithms (:mod:`~protonmf.nmf`, :mod:`~protonmf.head`, :mod:`~protonmf.nnls`),
fitting (:mod:`~protonmf.prototypes.fit`), backbones and the model artifact (:mod:`~protonmf.prototypes.model`). It knows
nothing of Prefect or Ray (``flows/`` and ``tasks/`` do), and works alone in a notebook.
"""

__version__ = "0.1.0"

from protonmf.lazy import lazy_exports  # noqa: E402

#: the public names, each imported from its module on first use: ``import protonmf.config`` (the
#: CLI's checks) does not import torch
__getattr__, __all__ = lazy_exports(__name__, {
    "ArtifactError": "prototypes.model",
    "BackboneSpec": "backbones.feature_backbone",
    "ClassPrototypes": "prototypes.fit",
    "Explanation": "prototypes.model",
    "FeatureBackbone": "backbones.feature_backbone",
    "NMFResult": "nmf",
    "PrototypeModel": "prototypes.model",
    "build_backbone": "backbones.feature_backbone",
    "fit_prototypes": "prototypes.fit",
    "nmf": "nmf",
    "stack_classes": "prototypes.fit",
})
