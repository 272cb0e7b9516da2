"""Strategies by name: the built-in ones register here; ``module:Class`` names any importable subclass."""

from __future__ import annotations

import importlib

from pydantic import ValidationError

from gptfl_ray.config import ConfigError, StrategyConfig, plugin_params_error
from gptfl_ray.fl.strategies.base import Strategy
from gptfl_ray.ray_env import ship_by_value

STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


def strategy_class(name: str) -> type[Strategy]:
    """The class ``fl.strategy.name`` names: a registered name, or ``module:Class`` (imported here).

    A ``module:Class`` from outside this package is shipped to the client actors with the task (its module is
    pickled by value), so it needs not be installed on the workers; modules *it* imports must be.
    """
    if ":" not in name:
        cls = STRATEGIES.get(name)
        if cls is None:
            raise ConfigError(
                f"fl.strategy.name: unknown strategy {name!r} (known: {', '.join(STRATEGIES)}, or module:Class)"
            )
        return cls
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the module itself failing: one line naming the field
        raise ConfigError(
            f"fl.strategy.name: cannot import {module_name!r} ({type(err).__name__}: {err})"
        ) from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"fl.strategy.name: {name!r} is not a Strategy subclass")
    ship_by_value(module_name)
    return cls


def build_strategy(cfg: StrategyConfig) -> Strategy:
    """The strategy named by ``fl.strategy.name`` with its parameters validated from the section's extra keys."""
    cls = strategy_class(cfg.name)
    try:
        params = cls.Params.model_validate(cfg.model_extra or {})
    except ValidationError as err:
        raise plugin_params_error(err, "fl.strategy", "unknown parameter", cfg.name) from None
    return cls(params)
