"""FL algorithms, one module each (docstring: paper and math); both halves of an algorithm in one class.

The API is :mod:`gptfl_ray.fl.strategies.base`. Add an algorithm: a module with a ``Strategy`` subclass that
has a ``name`` and a pydantic ``Params``; decorate it with ``@register`` and add its module to ``BUILTIN``, or name it as
``fl.strategy.name: my_module:MyStrategy`` without touching this package.
"""

import importlib

from gptfl_ray.fl.strategies.base import (
    ClientContext,
    ClientResult,
    PublicData,
    ServerContext,
    Strategy,
    StrategyParams,
)
from gptfl_ray.fl.strategies.fedavg import FedAvg
from gptfl_ray.fl.strategies.registry import STRATEGIES, build_strategy, register, strategy_class

# The built-in algorithms, registered on import in this order (the order error messages list them in).
BUILTIN = (
    "fedavg",
    "fedprox",
    "scaffold",
    "fedavgm",
    "fedopt",
    "feddf",
    "dsfl",
    "fedet",
    "fedgen",
    "dynafed",
)
for _module in BUILTIN:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "STRATEGIES",
    "ClientContext",
    "ClientResult",
    "FedAvg",
    "PublicData",
    "ServerContext",
    "Strategy",
    "StrategyParams",
    "build_strategy",
    "register",
    "strategy_class",
]
