"""Model registry: one name -> one constructor ``(num_classes, input_shape, **kw) -> nn.Module``.

Which names exist and which take ``width`` is stated once, in ``gptfl_ray.models.specs``. A ``module:callable``
name builds a model from any importable module: the callable takes ``(num_classes, input_shape)`` and returns the
``nn.Module``. A module from outside this package is pickled by value (``ray.cloudpickle``) and its resolved
callables travel to Ray workers with the work they receive (``plugin_models`` -> ``install_models``), so it need
not be importable there; modules *it* imports must be.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable

from torch import nn

from gptfl_ray.errors import ConfigError, shorten
from gptfl_ray.models.convnet import AudioCNN, ConvNet, MnistCNN
from gptfl_ray.models.specs import HF_PREFIX, TEXT_MODELS, WIDTH_MODELS, check_model_options, is_hf, is_plugin
from gptfl_ray.models.text import HFSequenceClassifier, TextCNN
from gptfl_ray.ray_env import ship_by_value


def _vision():
    """torchvision's models load on first use: importing them imports torch._dynamo too, seconds of every
    client actor's start-up that a run of the small CNNs never needs."""
    from gptfl_ray.models import vision

    return vision


# One entry per specs.MODEL_NAMES; only the WIDTH_MODELS constructors take `width`.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "convnet": lambda n, s, width=None: ConvNet(n, s, width=width or 128),
    "cnn": lambda n, s: MnistCNN(n, s),
    "audio_cnn": lambda n, s: AudioCNN(n, s),
    "resnet18": lambda n, s: _vision().cifar_resnet(18, n, s),
    "resnet50": lambda n, s: _vision().cifar_resnet(50, n, s),
    "vgg19": lambda n, s: _vision().VGG19(n, s),
    "text_cnn": lambda n, s: TextCNN(n, s),
}


# Resolved `module:callable` models of this process (the driver's imports, or what a worker was sent).
_PLUGINS: dict[str, Callable[..., nn.Module]] = {}


def model_callable(name: str) -> Callable[..., nn.Module]:
    """The callable a ``module:callable`` model name names (imported here once; cached); ConfigError naming
    ``model.name`` when the module does not import or the attribute is not callable."""
    if name in _PLUGINS:
        return _PLUGINS[name]
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the module itself failing: one line naming the field
        first = shorten(str(err).splitlines()[0] if str(err) else "", 160)
        raise ConfigError(
            f"model.name: cannot import {module_name!r} ({type(err).__name__}: {first})"
        ) from None
    fn: object = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ConfigError(f"model.name: {name!r} is not a callable (num_classes, input_shape) -> nn.Module")
    ship_by_value(module_name)
    _PLUGINS[name] = fn  # type: ignore[assignment]
    return fn  # type: ignore[return-value]


def plugin_models(names: Iterable[str | None]) -> dict[str, Callable[..., nn.Module]]:
    """The resolved callables of the ``module:callable`` names among ``names``, to send to Ray workers."""
    return {n: model_callable(n) for n in names if n is not None and is_plugin(n)}


def install_models(models: dict[str, Callable[..., nn.Module]] | None) -> None:
    """On a worker: make ``build_model`` use the callables the driver resolved (``plugin_models``)."""
    _PLUGINS.update(models or {})


def build_model(
    name: str, num_classes: int, input_shape: tuple[int, ...], width: int | None = None
) -> nn.Module:
    """Build a freshly initialised model for ``input_shape`` = (C, H, W) inputs, or (L,) token ids of a text
    dataset (``text_cnn``, ``hf:`` models, ``module:callable``)."""
    check_model_options(name, width)
    if len(input_shape) not in (1, 3):
        raise ValueError(f"model: input_shape must be (C, H, W) or (L,), got {tuple(input_shape)}")
    if is_hf(name):
        return HFSequenceClassifier(name[len(HF_PREFIX) :], num_classes, tuple(input_shape))
    if len(input_shape) != 3 and name not in TEXT_MODELS and not is_plugin(name):
        raise ValueError(
            f"model: {name} takes images or spectrograms (C, H, W), not token ids {tuple(input_shape)}"
        )
    if is_plugin(name):
        fn = model_callable(name)
        try:
            net = fn(num_classes, tuple(input_shape))
        except Exception as err:  # the user's code: one line naming the field
            first = shorten(str(err).strip().splitlines()[0] if str(err).strip() else "", 160)
            raise ConfigError(
                f"model.name: {name!r} does not build for {num_classes} classes and inputs "
                f"{tuple(input_shape)} ({type(err).__name__}: {first})"
            ) from None
        if not isinstance(net, nn.Module):
            raise ConfigError(f"model.name: {name!r} returned {type(net).__name__}, not a torch nn.Module")
        return net
    ctor = MODELS[name]
    return ctor(num_classes, tuple(input_shape), **({"width": width} if name in WIDTH_MODELS else {}))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
