"""The client side: local training and evaluation, and the Ray actor class that serves virtual clients.

A pool of K actors serves N ≫ K virtual clients. An actor builds its model, flat views and optimizer once;
a task names the round's global weights and one client's shard, both ObjectRefs that Ray resolves to
zero-copy numpy arrays in the shared-memory object store (nothing is re-pickled per round). Every task is
seeded from (run seed, round, client), so a client's update does not depend on which actor computed it:
a re-dispatched or resumed task reproduces it bit for bit.

The actor class is plain Python (``ray.remote`` is applied by the pool), so a mixin can add methods, e.g.
secure-aggregation masking: ``class SecAggClient(SecAggMixin, FLClient)``.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gptfl_ray.config import LocalTrainConfig, StrategyConfig
from gptfl_ray.fl.flat import FlatModel, VectorLayout, from_shared
from gptfl_ray.fl.strategies import ClientContext, FedAvg, Strategy, build_strategy
from gptfl_ray.fl.strategies.base import StrategyParams
from gptfl_ray.models import build_model
from gptfl_ray.models.registry import install_models
from gptfl_ray.training import make_optimizer

Shard = tuple[np.ndarray, np.ndarray]  # (inputs float32 (n, C, H, W), labels int64 (n,))


@dataclass(frozen=True)
class ClientSpec:
    """Everything an actor needs to build its model and optimizer once.

    ``model``/``width`` is the model clients train; ``eval_model``/``eval_width`` the server's model that
    evaluation tasks run, when it differs (heterogeneous strategies). ``strategy_class`` is the resolved class
    (a ``module:Class`` from outside the package travels by value, see ``strategies.registry``).
    """

    model: str
    num_classes: int
    input_shape: tuple[int, int, int]
    width: int | None
    local: LocalTrainConfig
    strategy: StrategyConfig
    eval_batch_size: int = 512
    num_cpus: float = 1.0
    use_gpu: bool = False
    eval_model: str | None = None
    eval_width: int | None = None
    strategy_class: type | None = None
    # Resolved `module:callable` models by name (``models.registry.plugin_models``): they travel by value.
    models: dict[str, Any] | None = None


def local_train(
    flat: FlatModel,
    optimizer: torch.optim.Optimizer,
    strategy: Strategy,
    ctx: ClientContext,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[int, float]:
    """``epochs`` passes of minibatch training over (x, y) in a seeded order; returns (steps, mean loss)."""
    model = flat.model
    steps, loss_sum = 0, torch.zeros((), device=x.device)
    ctx.flat, ctx.batch_size = flat, batch_size
    if ctx.generator is None:
        ctx.generator = generator
    strategy.client_begin(ctx)
    model.train()
    extra = type(strategy).local_loss is not Strategy.local_loss
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator).to(x.device)
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            flat.zero_grad()
            xb, yb = x[idx], y[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            if extra and (term := strategy.local_loss(ctx, xb, yb, logits)) is not None:
                loss = loss + term
            loss.backward()
            strategy.adjust_gradients(flat.param.data, flat.param.grad, ctx)
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
    return steps, float(loss_sum) / max(steps, 1)


@torch.no_grad()
def evaluate_sums(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, batch_size: int
) -> dict[str, Any]:
    """Summed loss, per-class hit/sample counts and the confusion matrix (rows: true class, columns: predicted),
    so evaluations of test-set slices add up exactly (accuracy and F1: ``metrics.eval_metrics``)."""
    was_training = model.training
    model.eval()
    device = x.device
    loss = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    for i in range(0, len(y), batch_size):
        out = model(x[i : i + batch_size])
        yb = y[i : i + batch_size]
        loss += F.cross_entropy(out, yb, reduction="sum").double()
        confusion += torch.bincount(yb * num_classes + out.argmax(1), minlength=num_classes * num_classes)
    model.train(was_training)
    cm = confusion.view(num_classes, num_classes).cpu().numpy()
    return {
        "loss_sum": float(loss),
        "correct": cm.diagonal().copy(),
        "count": cm.sum(axis=1),
        "confusion": cm,
    }


def task_seed(seed: int, rnd: int, cid: int, slot: int = 0) -> int:
    """Seed of one training task: a function of (run seed, round, client, position in the round)."""
    return int(np.random.SeedSequence([seed, rnd, cid, slot]).generate_state(1)[0])


class FLClient:
    """Client actor: one model, its flat views and its optimizer, reused for every virtual client it serves."""

    def __init__(self, spec: ClientSpec):
        # One torch thread per allotted CPU (Ray sets OMP_NUM_THREADS, but torch may already be initialised).
        torch.set_num_threads(max(1, int(spec.num_cpus)))
        # Pretrained weights produce denormal activations/gradients that are very slow on x86 CPUs.
        torch.set_flush_denormal(True)
        self.spec = spec
        self.device = torch.device("cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu")
        install_models(spec.models)
        model = build_model(spec.model, spec.num_classes, spec.input_shape, width=spec.width).to(self.device)
        self.layout = VectorLayout.of(model)
        self.flat = FlatModel(model, self.layout)
        self.eval_flat = self.flat
        if spec.eval_model is not None:  # clients train a different model than the server evaluates
            m = build_model(spec.eval_model, spec.num_classes, spec.input_shape, width=spec.eval_width)
            self.eval_flat = FlatModel(m.to(self.device), VectorLayout.of(m))
        if spec.strategy_class is not None:
            cls = spec.strategy_class
            params: StrategyParams = cls.Params.model_validate(spec.strategy.model_extra or {})
            self.strategy = cls(params)
        else:
            self.strategy = build_strategy(spec.strategy)
        self.plain = FedAvg(FedAvg.Params())  # the isolated control trains without algorithm terms
        self.optimizer = make_optimizer([self.flat.param], spec.local.optimizer)

    def reconfigure(self, spec: ClientSpec) -> dict[str, Any]:
        """Serve another run from now on: this process's object state is rebuilt from ``spec`` as a new actor's
        would be (nothing of the previous run's stays, mixins' state included). Returns :meth:`info`."""
        self.__dict__.clear()
        self.__init__(spec)  # type: ignore[misc]  # the whole MRO's, as at actor creation
        return self.info()

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return from_shared(a).to(self.device, non_blocking=True)

    def _fit(
        self,
        weights: np.ndarray,
        shard: Shard,
        strategy: Strategy,
        broadcast,
        state,
        seed: int,
        epochs: int,
        public: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, ClientContext, int, float]:
        w = self._tensor(weights)
        self.flat.load(w)
        self.optimizer.state.clear()  # a fresh local optimizer for every task, as in standard FL
        torch.manual_seed(seed)  # dropout etc.
        ctx = ClientContext(
            global_params=w[: self.layout.num_trainable],
            lr=self.spec.local.optimizer.lr,
            broadcast={k: self._tensor(v) for k, v in (broadcast or {}).items()},
            state=None if state is None else {k: v.to(self.device) for k, v in state.items()},
            public=None if public is None else self._tensor(public),
        )
        x, y = self._tensor(shard[0]), self._tensor(shard[1])
        steps, loss = local_train(
            self.flat,
            self.optimizer,
            strategy,
            ctx,
            x,
            y,
            epochs=epochs,
            batch_size=self.spec.local.batch_size,
            generator=torch.Generator().manual_seed(seed),
        )
        return w, ctx, steps, loss

    def train(
        self,
        weights: np.ndarray,
        shard: Shard,
        broadcast: dict[str, np.ndarray] | None,
        state: dict[str, torch.Tensor] | None,
        seed: int,
        public: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """One virtual client's local training from ``weights``: its update Δ = y − x as float32 (None when
        the strategy uploads no weights), extra uploads, and what the client keeps (``state``)."""
        t0 = time.perf_counter()
        w, ctx, steps, loss = self._fit(
            weights, shard, self.strategy, broadcast, state, seed, self.spec.local.epochs, public
        )
        uploads = self.strategy.client_end(ctx, self.flat.param.data, steps)
        delta = (self.flat.vector() - w).cpu().numpy() if self.strategy.uploads_weights else None
        return {
            "delta": delta,
            "num_samples": len(shard[1]),
            "steps": steps,
            "train_loss": loss,
            "uploads": {k: v.float().cpu().numpy() for k, v in uploads.items()},
            "state": {k: v.detach().cpu() for k, v in ctx.keep.items()} or None,
            "seconds": time.perf_counter() - t0,
        }

    def evaluate(self, weights: np.ndarray, test: Shard) -> dict[str, Any]:
        """Evaluation sums of the server's ``weights`` on a (slice of the) test set."""
        self.eval_flat.load(self._tensor(weights))
        return evaluate_sums(
            self.eval_flat.model,
            self._tensor(test[0]),
            self._tensor(test[1]),
            self.spec.num_classes,
            self.spec.eval_batch_size,
        )

    def fit_evaluate(
        self, weights: np.ndarray, shard: Shard, test: Shard, seed: int, epochs: int
    ) -> dict[str, Any]:
        """Client-isolated fine-tuning: train on the client's own data alone, then evaluate on ``test``."""
        _, _, steps, loss = self._fit(weights, shard, self.plain, None, None, seed, epochs)
        out = evaluate_sums(
            self.flat.model,
            self._tensor(test[0]),
            self._tensor(test[1]),
            self.spec.num_classes,
            self.spec.eval_batch_size,
        )
        return {**out, "num_samples": len(shard[1]), "steps": steps, "train_loss": loss}

    def info(self) -> dict[str, Any]:
        """Process facts for logs and benchmarks (peak RSS in MiB)."""
        return {
            "pid": os.getpid(),
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
