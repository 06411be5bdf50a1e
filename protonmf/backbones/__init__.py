"""Black boxes: a network and the layer whose features ProtoNMF factorizes.

- :mod:`~protonmf.backbones.feature_backbone`: :class:`BackboneSpec` (what to build: torchvision,
  timm or the project's own nets, weights, feature layer, head) and :class:`FeatureBackbone`
  (features F and the linear head V, bias of any such network);
- :mod:`~protonmf.backbones.layer_cut`: a network cut at an inner layer (CRAFT's recursion);
- :mod:`~protonmf.backbones.hooks`: running a network up to one module and stopping there;
- :mod:`~protonmf.backbones.nets`: small networks of the project's own (``protonmf:<name>``).
"""

from protonmf.backbones.feature_backbone import BackboneSpec, FeatureBackbone, build_backbone, load_state_dict, weights_sha256

__all__ = ["BackboneSpec", "FeatureBackbone", "build_backbone", "load_state_dict", "weights_sha256"]
