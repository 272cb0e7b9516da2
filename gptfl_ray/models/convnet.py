"""Small convolutional nets: DynaFed/GPT-FL's ConvNet, the classic MNIST CNN, and an audio CNN on log-mel."""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """``depth`` × [conv3×3(width) → instance norm → ReLU → avgpool2] → linear (DynaFed / GPT-FL ConvNet).

    Instance norm is GroupNorm with one group per channel (affine), as in the reference implementation.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], width: int = 128, depth: int = 3):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [
                nn.Conv2d(c, width, 3, padding=1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(inplace=True),
            ]
            layers.append(nn.AvgPool2d(2))
            c, h, w = width, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class MnistCNN(nn.Module):
    """conv(1→32,3)-relu-maxpool-conv(32→64,3)-relu-maxpool-fc(→128)-relu-fc(128→classes)."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        fh, fw = ((h - 2) // 2 - 2) // 2, ((w - 2) // 2 - 2) // 2
        self.classifier = nn.Sequential(
            nn.Linear(64 * fh * fw, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class AudioCNN(nn.Module):
    """4 × [conv3×3 → GroupNorm → ReLU → maxpool2] over log-mel, global average pool, linear.

    GroupNorm instead of BatchNorm: no running statistics to average across non-IID clients.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, int, int],
        widths: tuple[int, ...] = (32, 64, 128, 128),
    ):
        super().__init__()
        c = input_shape[0]
        layers: list[nn.Module] = []
        for wd in widths:
            layers += [
                nn.Conv2d(c, wd, 3, padding=1),
                nn.GroupNorm(8, wd),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c = wd
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
