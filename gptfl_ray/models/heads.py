"""The feature-extractor / classifier-head split of a model, for algorithms that treat the head apart.

The *head* is the model's last ``nn.Linear`` (``named_modules`` order): the layer that maps features to logits
in every registry model (``ConvNet.classifier``, ``MnistCNN.classifier[2]``, ``AudioCNN.classifier[1]``,
torchvision ResNet ``fc``, ``VGG19.classifier``). Everything before it is the feature extractor, and the
head's input is the *feature* vector (as the head sees it: after the dropout in front of AudioCNN's head in
train mode).

- :func:`classifier_head`: (name, module) of the head;
- :func:`head_slices`: where the head's weight (and bias) lie in the flat vector of
  :class:`gptfl_ray.fl.flat.VectorLayout` (``[trainable params in named_parameters order | float buffers]``);
- :func:`features_and_logits`: (features, logits) of one forward pass, via a forward hook on the head.

Used by Fed-ET (head averaging and transfer) and FedGen (a generator in feature space).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # annotation only: importing gptfl_ray.fl here would be a cycle (its strategies import us)
    from gptfl_ray.fl.flat import VectorLayout


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's last ``nn.Linear`` and its module name; ValueError naming the model class if it has none."""
    found: tuple[str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise ValueError(f"{type(model).__name__}: no nn.Linear layer, so no classifier head to split off")
    return found


def head_slices(model: nn.Module, layout: VectorLayout) -> list[slice]:
    """Slices of the head's parameters in ``layout``'s flat vector: [weight, bias] (only [weight] without bias).

    ``vec[s].view(p.shape)`` for each slice ``s`` and head parameter ``p`` (in that order) is the parameter.
    """
    name, head = classifier_head(model)
    wanted = [f"{name}.weight"] + ([f"{name}.bias"] if head.bias is not None else [])
    offsets: dict[str, slice] = {}
    off = 0
    for e in layout.params:
        offsets[e.name] = slice(off, off + e.numel)
        off += e.numel
    missing = [w for w in wanted if w not in offsets]
    if missing:
        raise ValueError(
            f"{type(model).__name__}: head parameter(s) {', '.join(missing)} not in the vector layout "
            "(layout of another model?)"
        )
    return [offsets[w] for w in wanted]


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the head's input, the model's logits) for inputs ``x``, from one forward pass (a hook on the head).

    Runs in the model's current mode and the caller's grad mode. ValueError when the model's output is not the
    head's output (something after the last ``nn.Linear`` changes the logits: the split would be wrong).
    """
    _, head = classifier_head(model)
    seen: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["features"], seen["logits"] = inputs[0], output

    handle = head.register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    if "logits" not in seen or seen["logits"] is not logits:
        raise ValueError(
            f"{type(model).__name__}: the output is not the last nn.Linear's output, so the feature/head "
            "split does not apply"
        )
    return seen["features"], logits
