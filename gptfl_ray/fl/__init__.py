"""Step 4 of GPT-FL: federated fine-tuning with Ray actors as clients.

``gptfl_ray.fl.runner.run_federated`` runs one FL job (or the client-isolated control); strategies are
plug-ins in :mod:`gptfl_ray.fl.strategies`. Modules: flat (weights as one vector), client (actor + local
training), pool (dispatch, fault handling), server (round loop), aggregate/metrics, checkpoint, runner.

Kept import-light: client actors import this package, and must not pay for dataset/audio imports.
"""

from gptfl_ray.fl.strategies import STRATEGIES, Strategy, build_strategy, register

__all__ = ["STRATEGIES", "Strategy", "build_strategy", "register"]
