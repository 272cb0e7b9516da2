"""FedAvg (McMahan et al., AISTATS 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data"): clients run local SGD from the global weights x; the server applies the weighted mean update,
x ← x + η·Σ_i w_i·Δ_i / Σ_i w_i, with w_i the client's sample count (``weighted``) and η = ``server_lr``
(1 = plain FedAvg). Float buffers (BatchNorm statistics) are always averaged (η does not scale them).
"""

from __future__ import annotations

import torch
from pydantic import Field

from gptfl_ray.fl.strategies.base import Strategy, StrategyParams
from gptfl_ray.fl.strategies.registry import register


class ServerLrParams(StrategyParams):
    server_lr: float = Field(1.0, gt=0)


@register
class FedAvg(Strategy):
    """x ← x + η·mean(Δ) on the trainable part; buffers averaged."""

    name = "fedavg"
    Params = ServerLrParams

    def server_update(self, x: torch.Tensor, mean_delta: torch.Tensor | None) -> torch.Tensor:
        assert mean_delta is not None
        n, lr = self.num_trainable, self.params.server_lr
        out = x.clone()
        out[:n].add_(mean_delta[:n], alpha=lr)
        out[n:].add_(mean_delta[n:])
        return out
