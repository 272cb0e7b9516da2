"""What each downstream model accepts, kept free of torch so config validation can read it cheaply."""

from __future__ import annotations

import re
from pathlib import Path

# Every model name the registry builds (gptfl_ray/models/registry.py has one constructor per name).
MODEL_NAMES = ("convnet", "cnn", "audio_cnn", "resnet18", "resnet50", "vgg19", "text_cnn")
# Models over token ids (text datasets); the others take images or log-mel spectrograms (C, H, W).
TEXT_MODELS = frozenset({"text_cnn"})
# `hf:<hub id or local path>`: a Hugging Face sequence-classification model (gptfl_ray/models/text.py).
HF_PREFIX = "hf:"
# Models whose size `model.width` sets (ConvNet: channels per conv layer); the others have fixed widths.
WIDTH_MODELS = frozenset({"convnet"})
# `module:callable` names a model outside the registry: a callable (num_classes, input_shape) -> nn.Module.
_PLUGIN = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_hf(name: str) -> bool:
    """Whether ``name`` is a ``hf:<hub id or local path>`` model."""
    return name.startswith(HF_PREFIX)


def is_plugin(name: str) -> bool:
    """Whether ``name`` is a ``module:callable`` model (imported and checked when it is built)."""
    return ":" in name and not is_hf(name)


def hashed_ids_only(name: str) -> bool:
    """Whether the model reads only the hashing tokenizer's ids (its embedding has that many rows)."""
    return name in TEXT_MODELS


def name_error(name: str) -> str | None:
    """Why ``model.name`` is invalid, or None."""
    if is_hf(name):
        path = name[len(HF_PREFIX) :]
        if not path.strip():
            return "hf: needs a Hugging Face model id or local path (e.g. hf:prajjwal1/bert-tiny)"
        if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().is_dir():
            return f"no model folder {path!r} (hf:<hub id or local path>)"
        return None
    if is_plugin(name):
        return None if _PLUGIN.fullmatch(name) else "must be module:callable (e.g. mypkg.models:build)"
    if name not in MODEL_NAMES:
        return f"unknown model (known: {', '.join(MODEL_NAMES)}, or module:callable)"
    return None


def width_error(name: str, width: int | None) -> str | None:
    """Why ``model.width`` is invalid for model ``name`` (it would do nothing), or None."""
    if width is not None and is_hf(name):
        return "a hf: model takes no model.width (its config sets its size)"
    if width is not None and is_plugin(name):
        return "a module:callable model takes no model.width (its callable sets its own size)"
    if width is not None and name in MODEL_NAMES and name not in WIDTH_MODELS:
        return f"{name} has a fixed width (only {', '.join(sorted(WIDTH_MODELS))} takes model.width)"
    return None


def check_model_options(name: str, width: int | None) -> None:
    """Raise ValueError naming the field when ``model.name`` is unknown or ``model.width`` would do nothing."""
    if err := name_error(name):
        raise ValueError(f"model.name: {err} (got {name!r})")
    if err := width_error(name, width):
        raise ValueError(f"model.width: {err} (got {width!r})")
