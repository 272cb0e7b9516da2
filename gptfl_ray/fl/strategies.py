"""FL algorithms as plug-ins: one small class each, registered by name, both halves in one place.

A strategy's *client half* runs inside the client actor around local SGD (``client_begin``,
``adjust_gradients`` after every backward pass, ``client_end`` for extra uploads); its *server half* weights
and applies the round's updates (``aggregation_weight``, ``accept``, ``server_update``) and owns the server
state (momenta, control variates) that checkpoints save. Keeping both halves in one class means an
algorithm cannot be half-applied. Vectors follow :mod:`gptfl_ray.fl.flat`: the server optimizers and
SCAFFOLD act on the trainable part ``[:n]``; float buffers (BatchNorm statistics) are always averaged.

The FedAvg-family aggregation is a weighted sum of client vectors ``Σ_i [w_i·Δ_i, w_i]`` followed by
``server_update(x, Σ w_i·Δ_i / Σ w_i)``, so secure aggregation can replace the sum.

Add an algorithm: subclass, give it ``name`` and a ``Params`` model, decorate with ``@register``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gptfl_ray.config import ConfigError, StrategyConfig
from gptfl_ray.fl.client_state import ClientStateStore
from gptfl_ray.fl.flat import VectorLayout

STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


def build_strategy(cfg: StrategyConfig) -> Strategy:
    """The strategy named by ``fl.strategy.name`` with its parameters validated from the section's extra keys."""
    cls = STRATEGIES.get(cfg.name)
    if cls is None:
        raise ConfigError(f"fl.strategy.name: unknown strategy {cfg.name!r} (known: {', '.join(STRATEGIES)})")
    try:
        params = cls.Params.model_validate(cfg.model_extra or {})
    except ValidationError as err:
        msgs = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = "unknown parameter" if e["type"] == "extra_forbidden" else e["msg"]
            msgs.append(f"fl.strategy.{loc}: {msg} ({cfg.name})")
        raise ConfigError("; ".join(msgs)) from None
    return cls(params)


@dataclass
class ClientContext:
    """What the client half sees during one local-training task (tensors on the actor's device)."""

    global_params: torch.Tensor  # trainable part of the round's global weights
    lr: float  # local learning rate
    broadcast: dict[str, torch.Tensor] = field(default_factory=dict)  # the round's shared extras
    state: dict[str, torch.Tensor] | None = None  # this virtual client's persistent state, if any
    scratch: dict[str, torch.Tensor] = field(default_factory=dict)


class StrategyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # Aggregation weight of a client: its number of samples (True) or 1 (False, the official GPT-FL code).
    weighted: bool = True


class Strategy:
    """Base class: plain local SGD on the client, ``x + η·mean(Δ)`` on the server (FedAvg)."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[StrategyParams]] = StrategyParams

    def __init__(self, params: StrategyParams):
        self.params = params
        self.num_trainable = 0
        self.num_clients = 0

    # ------------------------------------------------------------------------------ server half
    def setup(self, layout: VectorLayout, num_clients: int, state_dir: Path) -> None:
        """Called once on the server before the first round (or before restoring a checkpoint)."""
        self.num_trainable = layout.num_trainable
        self.num_clients = num_clients

    def aggregation_weight(self, num_samples: int) -> float:
        return float(num_samples) if self.params.weighted else 1.0

    def broadcast(self) -> dict[str, torch.Tensor]:
        """Extra tensors every client of the round receives (counted as downlink)."""
        return {}

    def upload_sizes(self) -> dict[str, int]:
        """Names and lengths of the extra vectors a client sends back (counted as uplink, validated)."""
        return {}

    def client_state(self, cid: int) -> dict[str, torch.Tensor] | None:
        """A virtual client's persistent state (held by the client in a real deployment: not downlink)."""
        return None

    def accept(self, cid: int, rnd: int, uploads: dict[str, torch.Tensor]) -> None:
        """One accepted client's extra uploads, in sampled order."""

    def end_round(self, applied: bool) -> None:
        """The round's updates were applied (True) or the round was dropped (False)."""

    def server_update(self, x: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        return x + mean_delta

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON metadata) for the checkpoint."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pass

    def checkpoint_committed(self) -> None:
        """The checkpoint holding ``state_dict()`` is now the one a resume starts from."""

    # ------------------------------------------------------------------------------ client half
    def client_begin(self, ctx: ClientContext) -> None:
        pass

    def adjust_gradients(self, params: torch.Tensor, grads: torch.Tensor, ctx: ClientContext) -> None:
        """Called after every backward pass with the flat trainable parameters and their gradients."""

    def client_end(self, ctx: ClientContext, params: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
        """Extra vectors to upload (see ``upload_sizes``)."""
        return {}


class _ServerLrParams(StrategyParams):
    server_lr: float = Field(1.0, gt=0)


@register
class FedAvg(Strategy):
    """McMahan et al. 2017: average of client updates, weighted by sample count (``weighted``)."""

    name = "fedavg"
    Params = _ServerLrParams

    def server_update(self, x: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        n, lr = self.num_trainable, self.params.server_lr
        out = x.clone()
        out[:n].add_(mean_delta[:n], alpha=lr)
        out[n:].add_(mean_delta[n:])
        return out


class _FedProxParams(_ServerLrParams):
    mu: float = Field(0.01, ge=0)


@register
class FedProx(FedAvg):
    """Li et al. 2020: local objective + μ/2·‖w − w_global‖², i.e. gradient + μ·(w − w_global)."""

    name = "fedprox"
    Params = _FedProxParams

    def adjust_gradients(self, params: torch.Tensor, grads: torch.Tensor, ctx: ClientContext) -> None:
        grads.add_(params - ctx.global_params, alpha=self.params.mu)


@register
class Scaffold(FedAvg):
    """Karimireddy et al. 2020 (option II): control variates c (server) and c_i (per virtual client).

    Client: every step uses g + c − c_i; after K steps at local lr η, Δc_i = (x − y_i)/(K·η) − c and
    c_i ← c_i + Δc_i. Server: x ← x + η_g·mean(Δy_i), c ← c + Σ_accepted Δc_i / N. The c_i live in a
    :class:`ClientStateStore` under the run folder (memory stays flat in the number of clients).
    """

    name = "scaffold"
    Params = _ServerLrParams

    def setup(self, layout: VectorLayout, num_clients: int, state_dir: Path) -> None:
        super().setup(layout, num_clients, state_dir)
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


class _FedAvgMParams(_ServerLrParams):
    momentum: float = Field(0.9, ge=0, lt=1)


@register
class FedAvgM(FedAvg):
    """Hsu et al. 2019: server momentum v ← β·v + mean(Δ); x ← x + η·v."""

    name = "fedavgm"
    Params = _FedAvgMParams

    def setup(self, layout: VectorLayout, num_clients: int, state_dir: Path) -> None:
        super().setup(layout, num_clients, state_dir)
        self.v = torch.zeros(self.num_trainable)

    def server_update(self, x: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
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


class _FedOptParams(StrategyParams):
    server_lr: float = Field(0.01, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)  # adaptivity; the second moment also starts at tau² (Reddi et al.)


class FedOpt(FedAvg):
    """Reddi et al. 2021, Algorithm 2: an adaptive server optimizer on the pseudo-gradient Δ = mean(Δ_i).

    m ← β1·m + (1−β1)·Δ;  v ← second_moment(v, Δ);  x ← x + η·m / (√v + τ);  m₀ = 0, v₀ = τ².
    """

    Params = _FedOptParams

    def setup(self, layout: VectorLayout, num_clients: int, state_dir: Path) -> None:
        super().setup(layout, num_clients, state_dir)
        self.m = torch.zeros(self.num_trainable)
        self.v = torch.full((self.num_trainable,), self.params.tau**2)

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def server_update(self, x: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
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
