"""ResNet18/50 and VGG19 in their CIFAR variants, built from torchvision's definitions.

CIFAR variant = 3×3 stride-1 stem without max-pool (ResNet) / a single linear head after global pooling
(VGG). Adaptive pooling makes both work unchanged at 224×224.
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm


def cifar_resnet(depth: int, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    net = {18: tvm.resnet18, 50: tvm.resnet50}[depth](weights=None, num_classes=num_classes)
    in_ch, h, _ = input_shape
    if h <= 64:  # small images: CIFAR stem
        net.conv1 = nn.Conv2d(in_ch, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_ch != 3:
        net.conv1 = nn.Conv2d(in_ch, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


class VGG19(nn.Module):
    """VGG19 with batch norm; features from torchvision, global average pool, linear(512 → classes)."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]):
        super().__init__()
        if min(input_shape[1:]) < 32:
            raise ValueError(
                f"model: vgg19 needs inputs of at least 32×32 (5 max-pools), got {tuple(input_shape)}"
            )
        features = tvm.vgg19_bn(weights=None).features
        if input_shape[0] != 3:
            features[0] = nn.Conv2d(input_shape[0], 64, kernel_size=3, padding=1)
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))
