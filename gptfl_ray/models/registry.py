"""Model registry: one name -> one constructor ``(num_classes, input_shape, **kw) -> nn.Module``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from gptfl_ray.models.convnet import AudioCNN, ConvNet, MnistCNN
from gptfl_ray.models.vision import VGG19, cifar_resnet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "convnet": lambda n, s, width=None: ConvNet(n, s, width=width or 128),
    "cnn": lambda n, s, width=None: MnistCNN(n, s),
    "audio_cnn": lambda n, s, width=None: AudioCNN(n, s),
    "resnet18": lambda n, s, width=None: cifar_resnet(18, n, s),
    "resnet50": lambda n, s, width=None: cifar_resnet(50, n, s),
    "vgg19": lambda n, s, width=None: VGG19(n, s),
}


def build_model(
    name: str, num_classes: int, input_shape: tuple[int, ...], width: int | None = None
) -> nn.Module:
    """Build a freshly initialised model for ``input_shape`` = (C, H, W) inputs."""
    try:
        ctor = MODELS[name]
    except KeyError:
        raise ValueError(f"model.name: unknown model {name!r} (known: {', '.join(MODELS)})") from None
    if len(input_shape) != 3:
        raise ValueError(f"model: input_shape must be (C, H, W), got {tuple(input_shape)}")
    return ctor(num_classes, tuple(input_shape), width=width)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
