"""DS-FL (Itahara et al., IEEE TMC 2021, "Distillation-Based Semi-Supervised Federated Learning for
Communication-Efficient Collaborative Training with Non-IID Private Data").

Clients share soft labels on unlabeled public (open) data U instead of model weights. Round t, with C classes:

1. the server draws the round's open indices O_t ⊂ U (``open_size_per_round``, capped at |U|, without
   replacement, seeded by (run seed, t)) and broadcasts them with the previous applied round's targets
   (their indices O_s and the |O_s|×C ERA probabilities);
2. each sampled client k loads *its own* model (kept from its last participation; at its first, the server's
   current model), distils it on U[O_s] against those targets, trains on its private data (the runtime's
   local training), and uploads p_k = softmax(f_k(U[O_t])) (eval mode), |O_t|·C values;
3. the server averages uniformly over the K accepted clients and applies entropy-reduction aggregation,
   ERA: t = softmax(((1/K)·Σ_k p_k) / T) per sample, T = ``era_temperature`` < 1 sharpening the mean;
4. it distils its own (the evaluated) model on U[O_t] against t, keeps t for the next broadcast.

Distillation (both halves) minimises KL(t ‖ softmax(f(u))), batch mean (``F.kl_div(..., "batchmean")``, as
BlazeFL; its gradient equals AIJack's soft-label cross-entropy), with plain SGD (``kd_lr``, no momentum) for
``kd_epochs`` epochs of ``kd_batch_size`` minibatches, reshuffled every epoch (client: the task's generator;
server: one seeded by (run seed, round)).

Defaults are BlazeFL's (``kitsuyaazuma/blazefl``, ``examples/step-by-step-dsfl/main.py``): T = 0.1,
|O_t| = 1,000, kd_epochs 5, kd_batch_size 50, kd_lr 0.1. There is no official code; the choices the paper
leaves open follow BlazeFL's ``algorithm/dsfl.py`` unless stated:

- order in a client task: distil on the previous targets, then train, then predict (AIJack: train, upload,
  distil in one round);
- the reported global model is the server's model, distilled on O_t every round (BlazeFL's ``server_acc``);
- a client's first participation starts from the server's current model, sent once and counted as downlink
  (BlazeFL/AIJack initialise each client's model locally); afterwards the client keeps its own model (held by
  the simulation in a :class:`~gptfl_ray.fl.client_state.ClientStateStore`, not communication);
- O_t is fresh every round and sorted; minibatches are shuffled (BlazeFL iterates O_t in drawn order);
- the client's local optimizer is the runtime's (``fl.local``, fresh per task) and the KD optimizer is fresh
  per task (BlazeFL keeps both optimizers' state; plain SGD without momentum has none, so this only differs
  with momentum);
- the mean is uniform over accepted clients (``weighted`` must stay false); a skipped round changes nothing
  (its soft labels and client models are dropped; the last applied targets stay);
- a client sampled twice in a round (``fl.with_replacement``) keeps the model of its later task.

Communication counted per dispatch: down |O_t| + |O_s| indices + |O_s|·C targets (+ the model at a client's
first participation); up |O_t|·C soft labels. No weight update travels up.

Secure aggregation: compatible in principle (ERA needs only Σ_k p_k over indices everyone labels), but this
runtime's secure aggregation sums model updates only, so DS-FL is refused there
(``Strategy.needs_individual_results`` is True when ``uploads_weights`` is False).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from gptfl_ray.fl.client_state import ClientStateStore
from gptfl_ray.fl.distill import kl_to_teacher, predict_logits, round_generator
from gptfl_ray.fl.flat import FlatModel, VectorLayout
from gptfl_ray.fl.strategies.base import ClientContext, ServerContext, Strategy, StrategyParams
from gptfl_ray.fl.strategies.registry import register


class DSFLParams(StrategyParams):
    weighted: Literal[False] = False  # ERA averages the clients' soft labels uniformly
    era_temperature: float = Field(0.1, gt=0)
    open_size_per_round: int = Field(1000, gt=0)  # capped at the public set's size
    kd_epochs: int = Field(5, gt=0)  # distillation epochs over the round's open samples (client and server)
    kd_batch_size: int = Field(50, gt=0)
    kd_lr: float = Field(0.1, gt=0)


def era(probs_mean: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy-reduction aggregation: softmax(mean client probabilities / T) over the class dimension."""
    return F.softmax(probs_mean / temperature, dim=-1)


def distil(
    flat: FlatModel,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
) -> int:
    """``epochs`` shuffled passes of SGD on KL(targets ‖ softmax(model(x))); returns the number of steps."""
    model = flat.model
    model.train()
    opt = torch.optim.SGD([flat.param], lr=lr)
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            flat.zero_grad()  # never opt.zero_grad(): the gradient is a view FlatModel owns
            kl_to_teacher(model(x[idx]), targets[idx]).backward()
            opt.step()
            steps += 1
    return steps


@register
class DSFL(Strategy):
    """Soft labels on the public data up, ERA targets down; clients keep their own models."""

    name = "dsfl"
    Params = DSFLParams
    public_data = "clients"
    uploads_weights = False

    params: DSFLParams

    def setup(
        self, layout: VectorLayout, num_clients: int, state_dir: Path, server: ServerContext | None = None
    ) -> None:
        super().setup(layout, num_clients, state_dir, server)
        if server is None or server.public is None:
            raise ValueError("dsfl: needs the server context with public data (public_data.source)")
        self.store = ClientStateStore(Path(state_dir) / "dsfl")
        self.round = 1  # the round in progress (begin_round)
        self.targets: torch.Tensor | None = None  # ERA targets of the last applied round, (|O_s|, C)
        self.target_idx: torch.Tensor | None = None  # their open indices O_s
        self._sum: torch.Tensor | None = None  # Σ_k p_k of the round, float64, in sampled order
        self._count = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_info: dict[str, float] = {}

    # ------------------------------------------------------------------------------ server half
    def open_indices(self, rnd: int) -> torch.Tensor:
        """O_rnd: ``open_size_per_round`` public indices without replacement, sorted; a function of (seed, rnd)."""
        assert self.server is not None and self.server.public is not None
        n = len(self.server.public)
        k = min(self.params.open_size_per_round, n)
        return torch.randperm(n, generator=round_generator(self.server.seed, rnd, salt=0))[:k].sort().values

    def begin_round(self, rnd: int) -> None:
        self.round = rnd

    def sends_weights(self, cid: int) -> bool:
        return cid not in self.store.current  # only a client without a kept model gets the global one

    def client_state(self, cid: int) -> dict[str, torch.Tensor] | None:
        return self.store.get(cid)

    def keep_state(self, cid: int, rnd: int, state: dict[str, torch.Tensor]) -> None:
        self.store.put(cid, rnd, {"weights": state["weights"]})

    def broadcast(self) -> dict[str, torch.Tensor]:
        out = {"open_idx": self.open_indices(self.round)}
        if self.targets is not None and self.target_idx is not None:
            out["target_idx"] = self.target_idx
            out["targets"] = self.targets
        return out

    def upload_sizes(self) -> dict[str, int]:
        assert self.server is not None and self.server.public is not None
        k = min(self.params.open_size_per_round, len(self.server.public))
        return {"soft_labels": k * self.server.num_classes}

    def accept(self, cid: int, rnd: int, uploads: dict[str, torch.Tensor]) -> None:
        if rnd != self.round:
            raise RuntimeError(f"dsfl: result of round {rnd} while round {self.round} is in progress")
        p = uploads["soft_labels"].double()
        self._sum = p.clone() if self._sum is None else self._sum + p
        self._count += 1

    def aggregate(self) -> torch.Tensor:
        """ERA over the round's accepted soft labels: (|O_t|, C) float32 targets."""
        assert self._sum is not None and self.server is not None
        mean = (self._sum / self._count).float().view(-1, self.server.num_classes)
        return era(mean, self.params.era_temperature)

    def server_update(self, x: torch.Tensor, mean_delta: torch.Tensor | None) -> torch.Tensor:
        if self._count == 0:
            return x
        ctx, p = self.server, self.params
        assert ctx is not None and ctx.public is not None
        targets = self.aggregate()
        open_idx = self.open_indices(self.round)
        net = ctx.build_model().to(ctx.device)
        flat = FlatModel(net, ctx.server_layout)
        flat.load(x.to(ctx.device))
        public = ctx.public.x[open_idx].to(ctx.device)
        t = targets.to(ctx.device)
        before = float(kl_to_teacher(predict_logits(net, public), t))
        with torch.random.fork_rng(devices=[]):  # dropout, if any, seeded by (run seed, round)
            torch.manual_seed(round_generator(ctx.seed, self.round, salt=2).initial_seed())
            steps = distil(
                flat,
                public,
                t,
                epochs=p.kd_epochs,
                batch_size=p.kd_batch_size,
                lr=p.kd_lr,
                generator=round_generator(ctx.seed, self.round, salt=1),
            )
        after = float(kl_to_teacher(predict_logits(net, public), t))
        entropy = float(-(targets * targets.clamp_min(1e-12).log()).sum(1).mean())
        self.last_info = {
            "kd_kl_before": before,
            "kd_kl": after,
            "kd_steps": steps,
            "target_entropy": entropy,
        }
        self._pending = (targets, open_idx)
        return flat.vector().cpu()

    def round_info(self) -> dict[str, float]:
        return dict(self.last_info)

    def end_round(self, applied: bool) -> None:
        if applied:
            if self._pending is not None:
                self.targets, self.target_idx = self._pending
            self.store.apply_round()
        else:
            self.store.drop_round()
            self.last_info = {}
        self._sum, self._count, self._pending = None, 0, None
        self.round += 1  # begin_round sets it again; kept so that unit tests can drive rounds without it

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {}
        if self.targets is not None and self.target_idx is not None:
            tensors = {"targets": self.targets.clone(), "target_idx": self.target_idx.clone()}
        return tensors, {"round": self.round, "client_state": self.store.index()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.round = int(meta["round"])
        self.targets = tensors["targets"].clone() if "targets" in tensors else None
        self.target_idx = tensors["target_idx"].clone() if "target_idx" in tensors else None
        self.store.restore(meta["client_state"])

    def checkpoint_committed(self) -> None:
        self.store.commit_checkpoint()

    # ------------------------------------------------------------------------------ client half
    def client_begin(self, ctx: ClientContext) -> None:
        assert ctx.flat is not None and ctx.public is not None and ctx.generator is not None
        if ctx.state is not None:
            ctx.flat.load(ctx.state["weights"])
        b, p = ctx.broadcast, self.params
        if "targets" in b:
            distil(
                ctx.flat,
                ctx.public[b["target_idx"]],
                b["targets"],
                epochs=p.kd_epochs,
                batch_size=p.kd_batch_size,
                lr=p.kd_lr,
                generator=ctx.generator,
            )

    def client_end(self, ctx: ClientContext, params: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
        assert ctx.flat is not None and ctx.public is not None
        ctx.keep["weights"] = ctx.flat.vector()
        logits = predict_logits(ctx.flat.model, ctx.public[ctx.broadcast["open_idx"]])
        return {"soft_labels": F.softmax(logits, dim=1).reshape(-1)}
