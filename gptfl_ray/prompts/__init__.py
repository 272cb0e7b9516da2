"""Step 1b: label names -> prompt table (templates.py) -> optional LLM expansion (expand.py).

Imports are lazy so ``gptfl_ray.config`` can use ``prompts.placeholders`` without pulling in pyarrow or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_prompt_table": "gptfl_ray.prompts.templates",
    "default_templates": "gptfl_ray.prompts.templates",
    "PROMPT_SCHEMA": "gptfl_ray.prompts.templates",
    "expand_prompts": "gptfl_ray.prompts.expand",
    "expand_rows": "gptfl_ray.prompts.expand",
    "count_fallbacks": "gptfl_ray.prompts.expand",
    "validate_expansion": "gptfl_ray.prompts.validation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
