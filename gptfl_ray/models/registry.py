"""Model registry: one name -> one constructor ``(num_classes, input_shape, **kw) -> nn.Module``.

Which names exist and which take ``width`` is stated once, in ``gptfl_ray.models.specs``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from gptfl_ray.models.convnet import AudioCNN, ConvNet, MnistCNN
from gptfl_ray.models.specs import WIDTH_MODELS, check_model_options
from gptfl_ray.models.vision import VGG19, cifar_resnet

# One entry per specs.MODEL_NAMES; only the WIDTH_MODELS constructors take `width`.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "convnet": lambda n, s, width=None: ConvNet(n, s, width=width or 128),
    "cnn": lambda n, s: MnistCNN(n, s),
    "audio_cnn": lambda n, s: AudioCNN(n, s),
    "resnet18": lambda n, s: cifar_resnet(18, n, s),
    "resnet50": lambda n, s: cifar_resnet(50, n, s),
    "vgg19": lambda n, s: VGG19(n, s),
}


def build_model(
    name: str, num_classes: int, input_shape: tuple[int, ...], width: int | None = None
) -> nn.Module:
    """Build a freshly initialised model for ``input_shape`` = (C, H, W) inputs."""
    check_model_options(name, width)
    if len(input_shape) != 3:
        raise ValueError(f"model: input_shape must be (C, H, W), got {tuple(input_shape)}")
    ctor = MODELS[name]
    return ctor(num_classes, tuple(input_shape), **({"width": width} if name in WIDTH_MODELS else {}))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
