"""FedOpt (Reddi et al., ICLR 2021, "Adaptive Federated Optimization"), Algorithm 2: an adaptive server optimizer
on the pseudo-gradient Δ = mean(Δ_i):

m ← β1·m + (1−β1)·Δ;  v ← second_moment(v, Δ);  x ← x + η·m / (√v + τ);  m₀ = 0, v₀ = τ².

FedAdagrad: v ← v + Δ²;  FedAdam: v ← β2·v + (1−β2)·Δ²;  FedYogi: v ← v − (1−β2)·Δ²·sign(v − Δ²).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from gptfl_ray.fl.flat import VectorLayout
from gptfl_ray.fl.strategies.base import ServerContext, StrategyParams
from gptfl_ray.fl.strategies.fedavg import FedAvg
from gptfl_ray.fl.strategies.registry import register


class FedOptParams(StrategyParams):
    server_lr: float = Field(0.01, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)  # adaptivity; the second moment also starts at tau² (Reddi et al.)


class FedOpt(FedAvg):
    """Shared server optimizer; subclasses give ``second_moment``."""

    Params = FedOptParams

    def setup(
        self, layout: VectorLayout, num_clients: int, state_dir: Path, server: ServerContext | None = None
    ) -> None:
        super().setup(layout, num_clients, state_dir, server)
        self.m = torch.zeros(self.num_trainable)
        self.v = torch.full((self.num_trainable,), self.params.tau**2)

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def server_update(self, x: torch.Tensor, mean_delta: torch.Tensor | None) -> torch.Tensor:
        assert mean_delta is not None
        n, p = self.num_trainable, self.params
        d = mean_delta[:n]
        self.m.mul_(p.beta1).add_(d, alpha=1 - p.beta1)
        self.v = self.second_moment(self.v, d * d)
        out = x.clone()
        out[:n].addcdiv_(self.m, self.v.sqrt().add_(p.tau), value=p.server_lr)
        out[n:].add_(mean_delta[n:])
        return out

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"m": self.m.clone(), "v": self.v.clone()}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.m, self.v = tensors["m"].clone(), tensors["v"].clone()


@register
class FedAdagrad(FedOpt):
    """v ← v + Δ²."""

    name = "fedadagrad"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v + d2


@register
class FedAdam(FedOpt):
    """v ← β2·v + (1−β2)·Δ²."""

    name = "fedadam"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v * self.params.beta2 + d2 * (1 - self.params.beta2)


@register
class FedYogi(FedOpt):
    """v ← v − (1−β2)·Δ²·sign(v − Δ²)."""

    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.params.beta2) * d2 * torch.sign(v - d2)
