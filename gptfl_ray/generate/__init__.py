"""Step 2: prompts -> synthetic data. One generator class per backend, registered by name; ``pipeline``
runs the chosen one in a Ray Data actor pool and writes resumable Parquet shards.

Imports are lazy: ``import gptfl_ray.generate`` loads no generator backend.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Generator": "gptfl_ray.generate.base",
    "GeneratorOptions": "gptfl_ray.generate.base",
    "Target": "gptfl_ray.generate.base",
    "get_generator": "gptfl_ray.generate.registry",
    "generator_names": "gptfl_ray.generate.registry",
    "register": "gptfl_ray.generate.registry",
    "generate": "gptfl_ray.generate.pipeline",
    "generate_command": "gptfl_ray.generate.pipeline",
    "synthetic_hash": "gptfl_ray.generate.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
