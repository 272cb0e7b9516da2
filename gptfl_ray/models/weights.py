"""``model.weights``: starting weights from a torchvision/timm-style state dict file.

A file is ``.safetensors`` or a ``torch.save``'d state dict (``.pth``/``.pt``, read with ``weights_only=True``:
tensors only, never arbitrary Python objects). Its keys must be exactly the built model's (the registry's ResNets
use torchvision's key names, so torchvision's ImageNet files load into ``resnet18``/``resnet50`` when the inputs
are larger than 64×64 and RGB: the ImageNet stem). The one exception is the classifier head, the last module that
holds parameters: where its shapes differ (another number of classes) it keeps its fresh initialisation, and the
log says so. Anything else is a one-line error naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptfl_ray.errors import InputError, InputNotFoundError, shorten

log = logging.getLogger(__name__)


def weights_identity(path: str | Path) -> dict[str, Any]:
    """What identifies a weights file in cache keys: its resolved path, size and modification time."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError:
        raise InputNotFoundError(f"{path}: model.weights file not found") from None
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (safetensors, or a torch.save'd dict of tensors); one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: model.weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # corrupt, truncated, pickled objects, wrong format: one line
        first = shorten(str(err).strip().splitlines()[0] if str(err).strip() else "", 160)
        raise InputError(
            f"{path}: model.weights is not a readable state dict ({type(err).__name__}: {first})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a training checkpoint's
        state = state["state_dict"]
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise InputError(f"{path}: model.weights holds no state dict (a dict of tensors)")
    return state


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier head: the last module (in registration order) that holds parameters."""
    last = None
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = name
    if last is None:
        return set()
    prefix = f"{last}." if last else ""
    return {k for k in model.state_dict() if k.startswith(prefix) and "." not in k[len(prefix) :]}


def match_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> list[str]:
    """Check ``state`` against ``model`` (shapes only; works on the meta device); returns the head keys that
    stay fresh. InputError naming the file on missing/unexpected keys or other shape mismatches."""
    ref = model.state_dict()
    head = head_keys(model)
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    differ = [k for k in ref if k in state and tuple(state[k].shape) != tuple(ref[k].shape)]
    bad_shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(ref[k].shape)}" for k in differ if k not in head]
    if missing or unexpected or bad_shapes:
        parts = [
            f"{what}: {', '.join(items[:3])}{' …' if len(items) > 3 else ''}"
            for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", bad_shapes))
            if items
        ]
        raise InputError(f"{path}: model.weights does not fit the model ({'; '.join(parts)})")
    return [k for k in differ if k in head]


def load_model_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load ``path`` into ``model`` in place; a classifier head of another shape stays fresh (logged).
    Returns the keys kept fresh."""
    state = read_state_dict(path)
    fresh = match_weights(model, state, path)
    keep = model.state_dict()
    model.load_state_dict({k: (keep[k] if k in fresh else v) for k, v in state.items()})
    if fresh:
        log.info("model.weights %s: classifier head %s has another shape, kept fresh", path, ", ".join(fresh))
    return fresh
