"""Small networks of the project's own, named ``protonmf:<name>`` in a backbone spec.

- ``tiny_vit``: a torchvision VisionTransformer with few, narrow layers: a real ViT (class token,
  patch grid, GELU, final LayerNorm) that runs in milliseconds on a CPU, for tests.
- ``small_cnn``: the demo backbone, a ResNet-style CNN for 64×64 images, ReLU features of its
  last stage pooled into a linear head (the shape the ProtoNMF method assumes).
"""

from __future__ import annotations

from typing import Callable

from torch import nn
from torchvision.models import VisionTransformer

__all__ = ["REGISTRY", "SmallCNN", "tiny_vit"]


def tiny_vit(num_classes: int = 10, image_size: int = 32, patch_size: int = 8, hidden_dim: int = 32) -> VisionTransformer:
    return VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=2,
        num_heads=2,
        hidden_dim=hidden_dim,
        mlp_dim=2 * hidden_dim,
        num_classes=num_classes,
    )


def _conv(c_in: int, c_out: int, kernel: int) -> nn.Conv2d:
    """A stride-1 convolution; 3×3 ones pad by replicating the border (no zero-padding artefacts)."""
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False, padding_mode="replicate")


def _down(c_in: int, c_out: int) -> nn.Conv2d:
    """A 2×2, stride-2 convolution: halves the grid, output cell i centred on input cells 2i, 2i+1."""
    return nn.Conv2d(c_in, c_out, 2, stride=2, bias=False)


def _block(first: nn.Conv2d, c_out: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        first,
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        _conv(c_out, c_out, kernel),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """64×64 images → ``layer4`` features (B, width·4, 8, 8) → average pool → ``fc``.

    Made to be cheap (it trains on two CPU cores in well under a minute) and to have *local*
    features, so that prototypes can find object parts:

    - the grid is halved three times by 2×2 stride-2 convolutions (``stem`` 64 → 32, ``layer2``
      32 → 16, ``layer3`` 16 → 8), so each 8×8 feature cell is centred on its 8×8 pixel block (a
      3×3 stride-2 convolution would shift the grid by half a cell);
    - ``layer3``'s second convolution and all of ``layer4`` are 1×1, so a feature cell sees 24×24
      pixels: a cell on the background does not see the object;
    - 3×3 convolutions pad by replicating the border, so image borders make no features of their own.

    ``layer4`` ends in a ReLU and ``fc`` sees its global average: the shape ProtoNMF assumes, so a
    :class:`~protonmf.backbones.FeatureBackbone`'s ``head_logits`` equals the network's logits.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_down(3, w), nn.BatchNorm2d(w), nn.ReLU(inplace=True))  # 32×32
        self.layer1 = _block(_conv(w, w, 3), w, 3)  # 32×32
        self.layer2 = _block(_down(w, 2 * w), 2 * w, 3)  # 16×16
        self.layer3 = _block(_down(2 * w, 4 * w), 4 * w, 1)  # 8×8
        self.layer4 = _block(_conv(4 * w, 4 * w, 1), 4 * w, 1)  # 8×8, per-cell
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.avgpool(x).flatten(1))


REGISTRY: dict[str, Callable[..., nn.Module]] = {"tiny_vit": tiny_vit, "small_cnn": SmallCNN}
