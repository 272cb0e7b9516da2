"""The server: sample clients, dispatch to the actor pool, fold updates in as they arrive, apply, evaluate.

Client shards are put into Ray's object store once per run and the global weights once per round; tasks
carry only references. Updates are validated when they arrive and folded into the round's sums in
*sampled* order (a small reorder buffer holds early finishers), so the aggregate is bit-identical however
the actors interleave — which is what makes re-dispatch and resume exact.

A round is queued (:meth:`FederatedServer.start_round`) before it is waited on (``finish_round``), so the
round loop can evaluate the previous round's weights in between: the evaluation goes ahead of the queued
training on the actors, and the training starts the moment an actor is done with it.

How the round's results become the mean update is one replaceable object per round: :class:`PlainAggregation`
(float32 updates, validated on the server) or ``gptfl_ray.fl.secure.SecureAggregation`` (SecAgg: the server
learns only the sum), chosen by ``fl.secure_aggregation``.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from gptfl_ray.config import FLConfig
from gptfl_ray.fl.aggregate import GradientDiversity, WeightedSum, check_vector
from gptfl_ray.fl.client import task_seed
from gptfl_ray.fl.data import FederatedData
from gptfl_ray.fl.flat import from_shared
from gptfl_ray.fl.metrics import BYTES_PER_VALUE, eval_metrics
from gptfl_ray.fl.pool import ClientPool, Task
from gptfl_ray.fl.strategies import ClientResult, Strategy

log = logging.getLogger(__name__)


def sample_clients(num_clients: int, k: int, *, seed: int, rnd: int, with_replacement: bool) -> list[int]:
    """The clients of round ``rnd``: a function of (seed, round) only, so resuming needs no RNG state."""
    rng = np.random.default_rng([seed, rnd])
    if with_replacement:
        return sorted(rng.choice(num_clients, size=k, replace=True).tolist())
    return sorted(rng.choice(num_clients, size=min(k, num_clients), replace=False).tolist())


class InOrderFold:
    """Folds the round's accepted updates into the sums in *sampled* order, whatever the arrival order.

    ``offer(i, item)`` hands over the i-th sampled task's outcome (``None``: lost or rejected); early
    finishers wait in a small reorder buffer until every earlier position has been offered.
    """

    def __init__(self, strategy: Strategy, rnd: int, size: int, start: torch.Tensor | None = None):
        self.strategy, self.rnd, self.start = strategy, rnd, start  # start: the weights clients trained from
        self.total = WeightedSum(size)
        self.diversity = GradientDiversity(size)
        self.loss_sum, self.loss_n = 0.0, 0
        self.wants_results = type(strategy).client_result is not Strategy.client_result
        self._pending: dict[int, tuple[int, dict[str, Any]] | None] = {}
        self._next = 0

    def offer(self, index: int, item: tuple[int, dict[str, Any]] | None) -> None:
        self._pending[index] = item
        while self._next in self._pending:
            item = self._pending.pop(self._next)
            self._next += 1
            if item is not None:
                self._add(self._next - 1, *item)

    def _add(self, slot: int, cid: int, v: dict[str, Any]) -> None:
        delta = None if v["delta"] is None else from_shared(v["delta"])
        if delta is not None:
            self.total.add(delta, self.strategy.aggregation_weight(v["num_samples"]))
            self.diversity.add(delta, float(torch.linalg.vector_norm(delta, dtype=torch.float64)))
        else:
            self.total.count += 1  # an accepted result without weights (e.g. DS-FL's soft labels)
        self.loss_sum += v["train_loss"] * v["num_samples"]
        self.loss_n += v["num_samples"]
        uploads = {k: from_shared(a) for k, a in v["uploads"].items()}
        if v.get("state"):
            self.strategy.keep_state(cid, self.rnd, v["state"])
        self.strategy.accept(cid, self.rnd, uploads)
        if self.wants_results:
            weights = None if delta is None or self.start is None else self.start + delta
            self.strategy.client_result(ClientResult(cid, self.rnd, slot, weights, uploads, v["num_samples"]))


@dataclass
class RoundSum:
    """What an aggregation hands back to the round loop."""

    count: int  # client updates in the sum
    mean: torch.Tensor | None  # Σ w·Δ / Σ w (None: nothing to apply)
    train_loss: float | None  # sample-weighted mean local training loss
    grad_diversity: float | None  # None where individual updates are not seen
    params_up: int  # values uploaded by clients
    bytes_up: int
    bytes_down: int = 0  # aggregation traffic to clients beyond the weights broadcast
    skip_reason: str | None = None  # the aggregation itself failed: skip the round
    record: dict[str, Any] = field(default_factory=dict)  # extra fields for the round's metrics line


class PlainAggregation:
    """Clients return float32 updates; each is validated on arrival and folded in (sampled order).

    One instance per round. The round loop dispatches ``method`` with ``task_args(...)``, reports every
    result to ``receive`` (returns a rejection reason or None) or ``lost``, then calls ``finish``.
    """

    method = "train"  # FLClient method run per sampled client

    def __init__(
        self,
        server: FederatedServer,
        rnd: int,
        sampled: list[int],
        size: int,
        start: torch.Tensor | None = None,
    ):
        self.max_norm = server.fl.max_update_norm
        self.size, self.uploads = size, server.strategy.upload_sizes()
        self.weights_up = server.strategy.uploads_weights
        self.fold = InOrderFold(server.strategy, rnd, size, start)
        self.received = 0

    def task_args(self, slot: int, args: tuple) -> tuple:
        return args

    def lost(self, slot: int) -> None:
        self.fold.offer(slot, None)

    def receive(self, slot: int, cid: int, value: dict[str, Any], actor: Any) -> str | None:
        self.received += 1
        reason = self._check(value)
        self.fold.offer(slot, None if reason else (cid, value))
        return reason

    def finish(self) -> RoundSum:
        fold = self.fold
        up = (self.size if self.weights_up else 0) + sum(self.uploads.values())
        return RoundSum(
            count=fold.total.count,
            mean=fold.total.mean(),
            train_loss=fold.loss_sum / fold.loss_n if fold.loss_n else None,
            grad_diversity=fold.diversity.value(),
            params_up=self.received * up,
            bytes_up=self.received * up * BYTES_PER_VALUE,
        )

    def _check(self, value: dict[str, Any]) -> str | None:
        if self.weights_up:
            if value["delta"] is None:
                return "update: missing"
            reason, _ = check_vector(from_shared(value["delta"]), self.size, self.max_norm)
            if reason:
                return f"update: {reason}"
        for name, n in self.uploads.items():
            if name not in value["uploads"]:
                return f"{name}: missing"
            reason, _ = check_vector(from_shared(value["uploads"][name]), n)
            if reason:
                return f"{name}: {reason}"
        return None


@dataclass
class RoundTasks:
    """A round whose training is queued on the pool (:meth:`FederatedServer.start_round`)."""

    rnd: int
    x: torch.Tensor  # the global weights the round started from
    sampled: list[int]
    agg: Any  # the round's aggregation (PlainAggregation or SecureAggregation)
    tasks: list[Task]
    down: list[int]  # values sent per dispatch of each task


def aggregation_for(fl: FLConfig) -> type[PlainAggregation]:
    if fl.secure_aggregation:
        from gptfl_ray.fl.secure import SecureAggregation  # imports the SecAgg protocol (cryptography)

        return SecureAggregation
    return PlainAggregation


class FederatedServer:
    def __init__(
        self,
        fl: FLConfig,
        data: FederatedData,
        strategy: Strategy,
        pool: ClientPool,
        *,
        seed: int,
        on_event: Callable[[dict[str, Any]], None],
    ):
        """``strategy`` must be set up already (its ``public_data`` decides whether clients get the public set)."""
        self.fl = fl
        self.strategy = strategy
        self.pool = pool
        self.seed = seed
        self.on_event = on_event
        self.num_clients = data.num_clients
        self.sizes = data.client_sizes()
        self.aggregation = aggregation_for(fl)
        self.shards = [ray.put((x.numpy(), y.numpy())) for x, y in data.clients]
        # The public set goes to the object store once; every task of a strategy that uses it names it.
        with_public = strategy.public_data == "clients" and data.public is not None
        self.public_ref = ray.put(data.public.numpy()) if with_public else None
        # The test set in one slice per actor: evaluation runs data-parallel over the pool.
        tx, ty = data.test
        bounds = np.linspace(0, len(ty), len(pool.actors) + 1).astype(int)
        self.test_slices = [
            ray.put((tx[a:b].numpy(), ty[a:b].numpy())) for a, b in itertools.pairwise(bounds) if b > a
        ]
        if fl.clients_per_round > self.num_clients and not fl.with_replacement:
            log.warning(
                "fl.clients_per_round=%d > %d clients: every client takes part in every round",
                fl.clients_per_round,
                self.num_clients,
            )

    # ------------------------------------------------------------------------------------ training
    def train_round(self, rnd: int, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """One round of local training and aggregation; returns the new global vector and the round's record."""
        return self.finish_round(self.start_round(rnd, x))

    def start_round(self, rnd: int, x: torch.Tensor) -> RoundTasks:
        """Sample round ``rnd``'s clients and queue their training from ``x`` on the pool (it starts when the
        pool is next waited on: evaluation run meanwhile goes ahead of it)."""
        fl, strategy = self.fl, self.strategy
        sampled = sample_clients(
            self.num_clients,
            fl.clients_per_round,
            seed=self.seed,
            rnd=rnd,
            with_replacement=fl.with_replacement,
        )
        strategy.begin_round(rnd)
        start = strategy.client_weights(x)  # what clients train from (Fed-ET: its small client model)
        x_ref = ray.put(start.numpy())
        broadcast = {k: v.numpy() for k, v in strategy.broadcast().items()}
        broadcast_ref = ray.put(broadcast) if broadcast else None
        size = start.numel()
        agg = self.aggregation(self, rnd, sampled, size, start)
        public = (self.public_ref,) if self.public_ref is not None else ()
        extras = sum(int(np.prod(a.shape)) for a in broadcast.values())
        down = [(size if strategy.sends_weights(cid) else 0) + extras for cid in sampled]  # per dispatch
        tasks = [
            Task(
                key=i,
                method=agg.method,
                args=agg.task_args(
                    i,
                    (
                        x_ref,
                        self.shards[cid],
                        broadcast_ref,
                        strategy.client_state(cid),
                        task_seed(self.seed, rnd, cid, i),
                        *public,
                    ),
                ),
                client=cid,
                cost=self.sizes[cid],  # training time, so the task's deadline, grows with the client's data
            )
            for i, cid in enumerate(sampled)
        ]
        self.pool.submit(tasks, fl.client_retries)
        return RoundTasks(rnd, x, sampled, agg, tasks, down)

    def finish_round(self, run: RoundTasks) -> tuple[torch.Tensor, dict[str, Any]]:
        """Fold round ``run.rnd``'s results in as they arrive, aggregate and apply the strategy's server update;
        returns the new global vector and the round's record."""
        fl, strategy = self.fl, self.strategy
        rnd, x, sampled, agg, tasks, down = run.rnd, run.x, run.sampled, run.agg, run.tasks, run.down
        rejected: list[int] = []
        lost: list[int] = []
        client_s = 0.0
        for out in self.pool.run(tasks, retries=fl.client_retries):
            cid = out.task.client
            if out.error:
                lost.append(cid)
                agg.lost(out.task.key)
                continue
            client_s += out.value["seconds"]
            reason = agg.receive(out.task.key, cid, out.value, out.actor)
            if reason:
                rejected.append(cid)
                self.on_event({"event": "update_rejected", "round": rnd, "client": cid, "reason": reason})
        total = agg.finish()

        needed = math.ceil(fl.min_clients_fraction * len(sampled))
        has_update = total.mean is not None or not strategy.uploads_weights
        applied = total.skip_reason is None and total.count >= needed and has_update
        t_server = time.perf_counter()
        if applied:
            x = strategy.server_update(x, total.mean)
        else:
            self.on_event(
                {
                    "event": "round_skipped",
                    "round": rnd,
                    "accepted": total.count,
                    "needed": needed,
                    "reason": total.skip_reason or "too few valid updates (fl.min_clients_fraction)",
                }
            )
        strategy.end_round(applied)
        server_s = time.perf_counter() - t_server

        params_down = sum(t.dispatches * down[t.key] for t in tasks)
        failed = sorted({t.client for t in tasks if t.dispatches > 1} | set(lost))
        record = {
            "round": rnd,
            "sampled": sampled,
            "num_updates": total.count,
            "rejected": rejected,
            "failed_clients": failed,
            "lost_clients": sorted(lost),
            "skipped": not applied,
            "train_loss": total.train_loss,
            "grad_diversity": total.grad_diversity,
            "client_time_s": client_s,  # summed local-training time of the received updates
            "server_time_s": server_s,  # the strategy's server update (distillation, server optimizers)
            "params_down": params_down,
            "params_up": total.params_up,
            "bytes_down": params_down * BYTES_PER_VALUE + total.bytes_down,
            "bytes_up": total.bytes_up,
            **total.record,
        }
        if applied and (info := strategy.round_info()):
            record["strategy_info"] = info
        return x, record

    # ---------------------------------------------------------------------------------- evaluation
    def evaluate(self, x: torch.Tensor) -> dict[str, Any]:
        """Accuracy, loss and per-class accuracy of ``x`` on the held-out set, data-parallel over the pool."""
        x_ref = ray.put(x.numpy())
        tasks = [Task(key=i, method="evaluate", args=(x_ref, ref)) for i, ref in enumerate(self.test_slices)]
        parts: dict[int, Any] = {}
        for out in self.pool.run(tasks, retries=self.pool.max_replacements):
            if out.error:
                raise RuntimeError(f"evaluation failed: {out.error}")
            parts[out.task.key] = out.value
        return eval_metrics([parts[i] for i in sorted(parts)])
