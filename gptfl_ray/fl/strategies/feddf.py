"""FedDF (Lin et al., NeurIPS 2020, "Ensemble Distillation for Robust Model Fusion in Federated Learning").

Each round the sampled clients train locally from x and upload their models x_k (as FedAvg). The server:

1. averages them, x̄ = x + mean_k(Δ_k) (uniform weights, ``weighted: false``, as the authors' code does);
2. distils the ensemble of the round's client models into x̄ on the unlabeled public data U: the teacher is
   p(u) = softmax(mean_k f(x_k; u) / T) (``avg_logits``, the README setting of the authors' code), and the
   student minimises KL(p(u) ‖ softmax(f(x̄; u) / T)) (``F.kl_div(..., "batchmean")``, no T²) with Adam
   (lr ``lr``, cosine-annealed over ``steps``, gradient norm clipped to ``grad_clip``) for at most ``steps``
   minibatches of ``batch_size``;
3. every ``eval_every`` steps it measures the same KL on a held-out slice of U (``val_fraction``; never the
   test set) and keeps the best student; it stops after ``patience`` steps without improvement.

The distilled student is the next global model. Communication equals FedAvg's (models down and up).

Deviations from the reference code (``epfml/federated-learning-public-code``, ``codes/FedDF-code``), stated:

- early stopping uses the held-out KL to the ensemble, not accuracy on a *labelled* server validation split
  (the public data here is unlabeled, and labels of the pool must not leak to the server);
- the teachers' ensemble targets are computed once per round on the un-augmented public data (the reference
  augments every batch with random crops/flips and re-runs all teachers per step): teachers are fixed within a
  round, so this is the same objective without augmentation at a fraction of the compute;
- defaults are the reference's (Adam 1e-3, T = 1, 10,000 steps, eval every 100, patience 1,000, batch 64);
  the sweep configs set fewer steps for CPU boxes and say so.

Needs every client's model on the server: refused under secure aggregation.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch.nn import functional as F

from gptfl_ray.fl.distill import kl_to_teacher, minibatches, predict_logits, round_generator
from gptfl_ray.fl.flat import FlatModel, VectorLayout
from gptfl_ray.fl.strategies.base import ClientResult
from gptfl_ray.fl.strategies.fedavg import FedAvg, ServerLrParams
from gptfl_ray.fl.strategies.registry import register


class FedDFParams(ServerLrParams):
    weighted: bool = False  # the reference averages client models uniformly
    temperature: float = Field(1.0, gt=0)
    steps: int = Field(10_000, gt=0)  # server distillation steps per round (upper bound)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    grad_clip: float = Field(5.0, gt=0)
    eval_every: int = Field(100, gt=0)
    patience: int = Field(1_000, gt=0)  # steps without a better held-out KL before stopping
    val_fraction: float = Field(0.1, gt=0, lt=1)


@register
class FedDF(FedAvg):
    """FedAvg, then ensemble distillation of the round's client models into the average on public data."""

    name = "feddf"
    Params = FedDFParams
    public_data = "server"

    def setup(self, layout, num_clients, state_dir, server=None) -> None:
        super().setup(layout, num_clients, state_dir, server)
        self.teachers: list[torch.Tensor] = []  # the round's client models, in sampled order
        self.rnd = 0
        self.last_distill: dict[str, float] = {}

    # server half
    def client_result(self, result: ClientResult) -> None:
        assert result.weights is not None
        self.teachers.append(result.weights.clone())

    def begin_round(self, rnd: int) -> None:
        self.rnd = rnd

    def end_round(self, applied: bool) -> None:
        self.teachers.clear()
        if not applied:
            self.last_distill = {}

    def server_update(self, x: torch.Tensor, mean_delta: torch.Tensor | None) -> torch.Tensor:
        averaged = super().server_update(x, mean_delta)
        return self.distill(averaged, self.teachers, self.rnd) if self.teachers else averaged

    def distill(self, student: torch.Tensor, teachers: list[torch.Tensor], rnd: int) -> torch.Tensor:
        """Ensemble distillation of ``teachers`` (model vectors) into ``student``; returns the best student."""
        ctx, p = self.server, self.params
        assert ctx is not None and ctx.public is not None
        public = ctx.public.x.to(ctx.device)
        train_idx, val_idx = self.split_public(len(public))
        targets = ensemble_probs(
            ctx.build_model, ctx.server_layout, teachers, public, p.temperature, ctx.device
        )
        net = ctx.build_model().to(ctx.device)
        flat = FlatModel(net, ctx.server_layout)
        flat.load(student.to(ctx.device))
        net.train()
        opt = torch.optim.Adam([flat.param], lr=p.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.steps)
        first = best = self.val_kl(net, public[val_idx], targets[val_idx])
        best_vec, best_step, step = student.clone(), 0, 0
        gen = round_generator(ctx.seed, rnd, salt=1)
        for step, idx in enumerate(minibatches(len(train_idx), p.batch_size, p.steps, gen), start=1):
            batch = train_idx[idx]
            flat.zero_grad()
            kl_to_teacher(net(public[batch]), targets[batch], p.temperature).backward()
            torch.nn.utils.clip_grad_norm_([flat.param], p.grad_clip)
            opt.step()
            sched.step()
            if step % p.eval_every == 0 or step == p.steps:
                kl = self.val_kl(net, public[val_idx], targets[val_idx])
                if kl < best:
                    best, best_vec, best_step = kl, flat.vector().cpu(), step
                elif step - best_step >= p.patience:
                    break
        self.last_distill = {"val_kl_before": first, "val_kl": best, "steps": step, "best_step": best_step}
        return best_vec

    def round_info(self) -> dict[str, float]:
        return dict(self.last_distill)

    def split_public(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, held-out) indices of the public set: fixed for the run (seeded by the run seed only)."""
        assert self.server is not None
        order = torch.randperm(n, generator=round_generator(self.server.seed, 0, salt=2))
        k = max(1, math.ceil(self.params.val_fraction * n))
        return order[k:], order[:k]

    def val_kl(self, net: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> float:
        logits = predict_logits(net, x)
        return float(
            F.kl_div(F.log_softmax(logits / self.params.temperature, 1), targets, reduction="batchmean")
        )


def ensemble_probs(
    build_model,
    layout: VectorLayout,
    teachers: list[torch.Tensor],
    x: torch.Tensor,
    temperature: float,
    device,
) -> torch.Tensor:
    """softmax(mean_k logits_k(x) / T) over the teacher model vectors (eval mode, no gradients)."""
    net = build_model().to(device)
    flat = FlatModel(net, layout)
    total = torch.zeros(())
    for i, vec in enumerate(teachers):
        flat.load(vec.to(device))
        logits = predict_logits(net, x)
        total = logits if i == 0 else total + logits
    return F.softmax(total / len(teachers) / temperature, dim=1)
