"""SCAFFOLD (Karimireddy et al., ICML 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning"),
option II: control variates c (server) and c_i (per virtual client).

Client: every step uses g + c − c_i; after K steps at local lr η, Δc_i = (x − y_i)/(K·η) − c and
c_i ← c_i + Δc_i. Server: x ← x + η_g·mean(Δy_i), c ← c + Σ_accepted Δc_i / N. The c_i live in a
:class:`~gptfl_ray.fl.client_state.ClientStateStore` under the run folder (memory stays flat in the number of
clients). Needs each client's Δc_i on the server: not available under secure aggregation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gptfl_ray.fl.client_state import ClientStateStore
from gptfl_ray.fl.flat import VectorLayout
from gptfl_ray.fl.strategies.base import ClientContext, ServerContext
from gptfl_ray.fl.strategies.fedavg import FedAvg, ServerLrParams
from gptfl_ray.fl.strategies.registry import register


@register
class Scaffold(FedAvg):
    """Control variates c, c_i; gradient correction c − c_i."""

    name = "scaffold"
    Params = ServerLrParams

    def setup(
        self, layout: VectorLayout, num_clients: int, state_dir: Path, server: ServerContext | None = None
    ) -> None:
        super().setup(layout, num_clients, state_dir, server)
        self.c = torch.zeros(self.num_trainable)
        self.store = ClientStateStore(Path(state_dir) / "scaffold")
        self._dc_sum = torch.zeros(self.num_trainable)

    # server half
    def broadcast(self) -> dict[str, torch.Tensor]:
        return {"c": self.c}

    def upload_sizes(self) -> dict[str, int]:
        return {"delta_c": self.num_trainable}

    def client_state(self, cid: int) -> dict[str, torch.Tensor] | None:
        return self.store.get(cid)

    def accept(self, cid: int, rnd: int, uploads: dict[str, torch.Tensor]) -> None:
        # With fl.with_replacement a client can appear twice in a round: both Δc count towards c,
        # its own c_i keeps the later one (each was computed from the same starting c_i).
        dc = uploads["delta_c"]
        old = self.store.get(cid)
        self.store.put(cid, rnd, {"c_i": dc.clone() if old is None else old["c_i"] + dc})
        self._dc_sum += dc

    def end_round(self, applied: bool) -> None:
        if applied:
            self.c += self._dc_sum / self.num_clients
            self.store.apply_round()
        else:
            self.store.drop_round()
        self._dc_sum.zero_()

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"c": self.c.clone()}, {"client_state": self.store.index()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.c = tensors["c"].clone()
        self.store.restore(meta["client_state"])

    def checkpoint_committed(self) -> None:
        self.store.commit_checkpoint()

    # client half
    def client_begin(self, ctx: ClientContext) -> None:
        c = ctx.broadcast["c"]
        ctx.scratch["correction"] = c - ctx.state["c_i"] if ctx.state else c.clone()

    def adjust_gradients(self, params: torch.Tensor, grads: torch.Tensor, ctx: ClientContext) -> None:
        grads.add_(ctx.scratch["correction"])

    def client_end(self, ctx: ClientContext, params: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
        c = ctx.broadcast["c"]
        if steps == 0:
            return {"delta_c": torch.zeros_like(c)}
        return {"delta_c": (ctx.global_params - params) / (steps * ctx.lr) - c}
