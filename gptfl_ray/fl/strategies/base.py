"""The algorithm API: one class holds both halves of an FL algorithm.

*Client half* (runs inside the client actor, once per sampled client and round):

- ``client_begin(ctx)``: before local training (e.g. DS-FL distils on the broadcast soft labels first);
- ``local_loss(ctx, inputs, labels, logits)``: extra loss terms added to the cross-entropy of every local step;
- ``adjust_gradients(params, grads, ctx)``: after every backward pass (FedProx, SCAFFOLD);
- ``client_end(ctx, params, steps)``: extra vectors to upload (SCAFFOLD's Δc, DS-FL's soft labels); anything the
  client keeps for its next participation goes into ``ctx.keep`` (held by the client: not communication).

*Server half* (runs on the driver): ``setup`` receives a :class:`ServerContext` (model builders, device, the
server-side public data); ``begin_round(rnd)`` opens a round; ``broadcast`` adds tensors to the round's downlink; ``accept`` sees each accepted
client's extra uploads and ``client_result`` its whole trained model, in sampled order (opt-in: overriding
either means the server needs individual results, so secure aggregation refuses the strategy);
``server_update(x, mean_delta)`` turns the round into the next global model; ``state_dict`` / ``load_state_dict``
checkpoint whatever the server keeps.

What travels is counted exactly (``gptfl_ray.fl.metrics``): the client model's weights down when
``sends_weights(cid)``, the broadcast, the weight update up when ``uploads_weights``, and ``upload_sizes()``.

Vectors follow :mod:`gptfl_ray.fl.flat` (``[trainable | float buffers]``). The FedAvg-family aggregate is
``Σ_i w_i·Δ_i / Σ_i w_i`` over the accepted clients, so secure aggregation can replace the sum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from gptfl_ray.fl.flat import FlatModel, VectorLayout


@dataclass
class ClientContext:
    """What the client half sees during one local-training task (tensors on the actor's device)."""

    global_params: torch.Tensor  # trainable part of the weights the client started from
    lr: float  # local learning rate
    broadcast: dict[str, torch.Tensor] = field(default_factory=dict)  # the round's shared extras
    state: dict[str, torch.Tensor] | None = None  # this virtual client's persistent state, if any
    scratch: dict[str, torch.Tensor] = field(default_factory=dict)
    flat: FlatModel | None = (
        None  # the client's model: ``flat.model``, its flat ``param`` (and ``grad``), ``load``
    )
    public: torch.Tensor | None = None  # the unlabeled public inputs (strategies with public_data="clients")
    batch_size: int = 32  # local minibatch size
    generator: torch.Generator | None = None  # the task's seeded generator (shuffles)
    keep: dict[str, torch.Tensor] = field(default_factory=dict)  # state to keep for the next participation


@dataclass
class ClientResult:
    """One accepted client's outcome, as :meth:`Strategy.client_result` sees it."""

    cid: int
    rnd: int
    slot: int  # position in the round's sampled list
    weights: torch.Tensor | None  # the client's trained model vector (None when it uploads no weights)
    uploads: dict[str, torch.Tensor]
    num_samples: int


@dataclass
class PublicData:
    """Unlabeled data held by the server (and, for strategies that need it there, by every client).

    ``x`` are model inputs (float32, like the clients' data); ``source`` says where they came from.
    """

    x: torch.Tensor
    source: Literal["holdout", "synthetic"]

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class ServerContext:
    """What the server half may use besides the round's results (handed to :meth:`Strategy.setup`)."""

    build_model: Callable[[], nn.Module]  # a fresh server model (the evaluated one), on CPU
    build_client_model: Callable[[], nn.Module]  # a fresh client model (``fl.client_model``, else the same)
    server_layout: VectorLayout  # layout of the server's (evaluated) weight vector
    device: torch.device
    seed: int
    num_classes: int
    client_sizes: list[int] = field(default_factory=list)  # samples per virtual client
    public: PublicData | None = None
    init_client_weights: torch.Tensor | None = (
        None  # the clients' initial model vector (heterogeneous models)
    )
    input_shape: tuple[int, ...] | None = None  # one sample's shape (C, H, W), e.g. for synthetic inputs


class StrategyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # Aggregation weight of a client: its number of samples (True) or 1 (False, the official GPT-FL code).
    weighted: bool = True


class Strategy:
    """Base class: plain local SGD on the client, ``x + mean(Δ)`` on the server (FedAvg)."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    # Where the algorithm needs the unlabeled public data (``public_data`` section): nowhere, on the server, or
    # on the server and every client.
    public_data: ClassVar[Literal["none", "server", "clients"]] = "none"
    # Whether clients may train a different model than the server's (``fl.client_model``).
    heterogeneous_models: ClassVar[bool] = False
    # Whether clients upload their weight update (False: only ``upload_sizes()`` travel up).
    uploads_weights: ClassVar[bool] = True
    # Whether the algorithm learns model inputs by gradient descent (DynaFed's distilled images): it needs
    # continuous inputs (images, audio features), not token ids.
    synthesizes_inputs: ClassVar[bool] = False

    def __init__(self, params: StrategyParams):
        self.params = params
        self.num_trainable = 0
        self.num_clients = 0
        self.server: ServerContext | None = None

    @classmethod
    def needs_individual_results(cls) -> bool:
        """True when the server half reads single clients' results or state (secure aggregation hides them)."""
        hooks = ("accept", "client_result", "client_state")
        return not cls.uploads_weights or any(getattr(cls, h) is not getattr(Strategy, h) for h in hooks)

    # ------------------------------------------------------------------------------ server half
    def setup(
        self, layout: VectorLayout, num_clients: int, state_dir: Path, server: ServerContext | None = None
    ) -> None:
        """Called once on the server before the first round (or before restoring a checkpoint).

        ``layout`` is the layout of the vector clients train (the client model).
        """
        self.num_trainable = layout.num_trainable
        self.num_clients = num_clients
        self.server = server

    def begin_round(self, rnd: int) -> None:
        """Round ``rnd`` starts (before ``client_weights``, ``broadcast`` and dispatch)."""

    def aggregation_weight(self, num_samples: int) -> float:
        return float(num_samples) if self.params.weighted else 1.0

    def client_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The model vector the round's clients start from (Fed-ET: its small client model)."""
        return x

    def sends_weights(self, cid: int) -> bool:
        """Whether client ``cid`` is sent ``client_weights(x)`` this round (DS-FL: only before its first round)."""
        return True

    def broadcast(self) -> dict[str, torch.Tensor]:
        """Extra tensors every client of the round receives (counted as downlink)."""
        return {}

    def upload_sizes(self) -> dict[str, int]:
        """Names and lengths of the extra vectors a client sends back (counted as uplink, validated)."""
        return {}

    def client_state(self, cid: int) -> dict[str, torch.Tensor] | None:
        """A virtual client's persistent state (held by the client in a real deployment: not downlink)."""
        return None

    def keep_state(self, cid: int, rnd: int, state: dict[str, torch.Tensor]) -> None:
        """Store what client ``cid`` put in ``ctx.keep`` (the simulation holds it for the client)."""

    def accept(self, cid: int, rnd: int, uploads: dict[str, torch.Tensor]) -> None:
        """One accepted client's extra uploads, in sampled order."""

    def client_result(self, result: ClientResult) -> None:
        """One accepted client's trained model and uploads, in sampled order (ensemble methods)."""

    def end_round(self, applied: bool) -> None:
        """The round's updates were applied (True) or the round was dropped (False)."""

    def server_update(self, x: torch.Tensor, mean_delta: torch.Tensor | None) -> torch.Tensor:
        """The next global vector from ``x`` and the round's mean client update (None: no weights uploaded)."""
        assert mean_delta is not None
        return x + mean_delta

    def round_info(self) -> dict[str, Any]:
        """JSON facts about the round's server step for its metrics line (key ``strategy_info``), e.g. the
        distillation's held-out loss and steps."""
        return {}

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

    def local_loss(
        self, ctx: ClientContext, inputs: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor | None:
        """Extra loss added to the cross-entropy of one local minibatch (None: nothing)."""
        return None

    def adjust_gradients(self, params: torch.Tensor, grads: torch.Tensor, ctx: ClientContext) -> None:
        """Called after every backward pass with the flat trainable parameters and their gradients."""

    def client_end(self, ctx: ClientContext, params: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
        """Extra vectors to upload (see ``upload_sizes``)."""
        return {}
