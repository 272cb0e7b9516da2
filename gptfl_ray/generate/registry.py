"""Generators by name (``generate.generator``).

Built-in generators are imported on first use (their modules are light; each backend imports its heavy
libraries in its constructor). A plug-in registers itself with :func:`register`.
"""

from __future__ import annotations

import importlib

from gptfl_ray.config import ConfigError
from gptfl_ray.generate.base import Generator

BUILTIN_MODULES = {
    "glyphs": "gptfl_ray.generate.image_glyphs",
    "espeak": "gptfl_ray.generate.speech_espeak",
    "diffusers": "gptfl_ray.generate.image_diffusers",
    "speecht5": "gptfl_ray.generate.speech_t5",
    "audioldm": "gptfl_ray.generate.audio_ldm",
    "remote": "gptfl_ray.generate.remote",
    "text-grammar": "gptfl_ray.generate.text_grammar",
    "text-llm": "gptfl_ray.generate.text_llm",
}

_REGISTRY: dict[str, type[Generator]] = {}


def register(cls: type[Generator]) -> type[Generator]:
    """Class decorator: make ``cls`` selectable as ``generate.generator: <cls.name>``."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"generator name {cls.name!r} already registered by {existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def get_generator(name: str) -> type[Generator]:
    if name not in _REGISTRY and name in BUILTIN_MODULES:
        importlib.import_module(BUILTIN_MODULES[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        known = sorted(set(BUILTIN_MODULES) | set(_REGISTRY))
        raise ConfigError(
            f"generate.generator: unknown generator {name!r} (known: {', '.join(known)})"
        ) from None


def generator_names() -> list[str]:
    return sorted(set(BUILTIN_MODULES) | set(_REGISTRY))
