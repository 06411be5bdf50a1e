"""protonmf: turn a trained image classifier into an exact, interpretable prototype model.

The core library: algorithms (:mod:`~protonmf.nmf`, :mod:`~protonmf.head`, :mod:`~protonmf.nnls`),
fitting (:mod:`~protonmf.prototypes.fit`), backbones and the model artifact (:mod:`~protonmf.prototypes.model`). It knows
nothing of Prefect or Ray (``flows/`` and ``tasks/`` do), and works alone in a notebook.
"""

__version__ = "0.1.0"

from protonmf.backbones.feature_backbone import BackboneSpec, FeatureBackbone, build_backbone  # noqa: E402
from protonmf.prototypes.fit import ClassPrototypes, fit_prototypes, stack_classes  # noqa: E402
from protonmf.prototypes.model import ArtifactError, Explanation, PrototypeModel  # noqa: E402
from protonmf.nmf import NMFResult, nmf  # noqa: E402

__all__ = [
    "ArtifactError",
    "BackboneSpec",
    "ClassPrototypes",
    "Explanation",
    "FeatureBackbone",
    "NMFResult",
    "PrototypeModel",
    "build_backbone",
    "fit_prototypes",
    "nmf",
    "stack_classes",
]
