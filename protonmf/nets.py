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


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """64×64 images → ``layer4`` features (B, width·4, 8, 8) → average pool → ``fc``."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.layer1 = _block(width, width, 1)
        self.layer2 = _block(width, 2 * width, 2)
        self.layer3 = _block(2 * width, 4 * width, 2)
        self.layer4 = _block(4 * width, 4 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.avgpool(x).flatten(1))


REGISTRY: dict[str, Callable[..., nn.Module]] = {"tiny_vit": tiny_vit, "small_cnn": SmallCNN}
