"""The paper's control: client-isolated fine-tuning (no federation).

k sampled clients each fine-tune the same initial model on their own data alone for E epochs and are
evaluated on the held-out set; the mean and std of their accuracies show what one client achieves without
FL. One line per client goes to metrics.jsonl as it finishes, so a resumed run trains only the missing ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from gptfl_ray.config import FLConfig
from gptfl_ray.fl.client import task_seed
from gptfl_ray.fl.data import FederatedData
from gptfl_ray.fl.metrics import eval_metrics, isolated_summary
from gptfl_ray.fl.pool import ClientPool, Task
from gptfl_ray.io import append_jsonl, read_jsonl

log = logging.getLogger(__name__)

ISOLATED_STREAM = 7_919  # separates the isolated control's client draw from the FL rounds' draws


def isolated_clients(num_clients: int, k: int, seed: int) -> list[int]:
    rng = np.random.default_rng([seed, ISOLATED_STREAM])
    return sorted(rng.choice(num_clients, size=min(k, num_clients), replace=False).tolist())


def run_isolated(
    fl: FLConfig,
    data: FederatedData,
    get_pool: Callable[[], ClientPool],
    x: torch.Tensor,
    *,
    seed: int,
    metrics_path: Path,
) -> dict[str, Any]:
    """Train and evaluate the control's clients not yet in ``metrics_path``; the pool starts only if needed."""
    t0 = time.perf_counter()
    clients = isolated_clients(data.num_clients, fl.isolated_clients, seed)
    epochs = fl.isolated_epochs or fl.local.epochs
    done = {r["client"]: r for r in read_jsonl(metrics_path) if "client" in r}
    todo = [c for c in clients if c not in done]
    if done:
        log.info(
            "isolated: %d of %d clients already done; training the rest",
            len(clients) - len(todo),
            len(clients),
        )
    pool = get_pool() if todo else None
    x_ref = ray.put(x.numpy()) if todo else None
    test_ref = ray.put((data.test[0].numpy(), data.test[1].numpy())) if todo else None
    tasks = []
    for cid in todo:
        shard = ray.put((data.clients[cid][0].numpy(), data.clients[cid][1].numpy()))
        args = (x_ref, shard, test_ref, task_seed(seed, 0, cid), epochs)
        size = len(
            data.clients[cid][1]
        )  # training time, so the task's deadline, grows with the client's data
        tasks.append(Task(key=cid, method="fit_evaluate", args=args, client=cid, cost=size))
    for out in pool.run(tasks, retries=pool.max_replacements) if pool else ():
        if out.error:
            raise RuntimeError(f"isolated training of client {out.task.client} failed: {out.error}")
        v = out.value
        ev = eval_metrics([v])
        rec = {
            "client": out.task.client,
            "accuracy": ev["accuracy"],
            "weighted_f1": ev["weighted_f1"],
            "macro_f1": ev["macro_f1"],
            "loss": ev["loss"],
            "num_samples": v["num_samples"],
            "train_loss": v["train_loss"],
            "epochs": epochs,
        }
        append_jsonl(metrics_path, rec)
        done[rec["client"]] = rec
        log.info(
            "isolated: client %d (%d samples) -> accuracy %.4f",
            rec["client"],
            rec["num_samples"],
            rec["accuracy"],
        )
    return isolated_summary(
        [done[c]["accuracy"] for c in clients],
        weighted_f1=[done[c].get("weighted_f1") for c in clients],
        macro_f1=[done[c].get("macro_f1") for c in clients],
        mode="isolated",
        isolated_clients=clients,
        isolated_epochs=epochs,
        isolated_num_samples=[done[c]["num_samples"] for c in clients],
        wall_time_s=time.perf_counter() - t0,
    )
