"""FedAvgM (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification"): server momentum on the mean update, v ← β·v + mean(Δ); x ← x + η·v.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from gptfl_ray.fl.flat import VectorLayout
from gptfl_ray.fl.strategies.base import ServerContext
from gptfl_ray.fl.strategies.fedavg import FedAvg, ServerLrParams
from gptfl_ray.fl.strategies.registry import register


class FedAvgMParams(ServerLrParams):
    momentum: float = Field(0.9, ge=0, lt=1)


@register
class FedAvgM(FedAvg):
    """Server momentum v (checkpointed)."""

    name = "fedavgm"
    Params = FedAvgMParams

    def setup(
        self, layout: VectorLayout, num_clients: int, state_dir: Path, server: ServerContext | None = None
    ) -> None:
        super().setup(layout, num_clients, state_dir, server)
        self.v = torch.zeros(self.num_trainable)

    def server_update(self, x: torch.Tensor, mean_delta: torch.Tensor | None) -> torch.Tensor:
        assert mean_delta is not None
        n = self.num_trainable
        self.v.mul_(self.params.momentum).add_(mean_delta[:n])
        out = x.clone()
        out[:n].add_(self.v, alpha=self.params.server_lr)
        out[n:].add_(mean_delta[n:])
        return out

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"v": self.v.clone()}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.v = tensors["v"].clone()
