"""FedProx (Li et al., MLSys 2020, "Federated Optimization in Heterogeneous Networks"): the local objective gains
a proximal term μ/2·‖w − x‖², i.e. every local gradient becomes g + μ·(w − x); the server is FedAvg's.
"""

from __future__ import annotations

import torch
from pydantic import Field

from gptfl_ray.fl.strategies.base import ClientContext
from gptfl_ray.fl.strategies.fedavg import FedAvg, ServerLrParams
from gptfl_ray.fl.strategies.registry import register


class FedProxParams(ServerLrParams):
    mu: float = Field(0.01, ge=0)


@register
class FedProx(FedAvg):
    """Gradient + μ·(w − w_global)."""

    name = "fedprox"
    Params = FedProxParams

    def adjust_gradients(self, params: torch.Tensor, grads: torch.Tensor, ctx: ClientContext) -> None:
        grads.add_(params - ctx.global_params, alpha=self.params.mu)
