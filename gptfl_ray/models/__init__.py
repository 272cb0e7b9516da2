"""Downstream models: ``build_model(name, num_classes, input_shape)``.

The registry (and torch) load on first use, so ``gptfl_ray.models.specs`` stays cheap for config validation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gptfl_ray.models.registry import MODELS, build_model, count_parameters

__all__ = ["MODELS", "build_model", "count_parameters"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gptfl_ray.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
