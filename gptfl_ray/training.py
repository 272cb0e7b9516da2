"""Training primitives shared by pretraining and FL clients: optimizer from config, evaluation; torch on one
thread for a block."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from gptfl_ray.config import OptimizerConfig


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch ops on one thread inside the block (restored after), for many small ops where extra intra-op threads
    only synchronise: resampling audio clips one by one (300 FSDD clips: 5.2 s with 2 threads, 0.2 s with one, on
    a busy 2-core box; identical output), server-side distillation steps in tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def make_optimizer(params: Iterable[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> dict[str, Any]:
    """Accuracy, weighted and macro F1, mean cross-entropy and per-class accuracy of ``model`` on (x, y)."""
    from gptfl_ray.fl.metrics import f1_scores

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    confusion = None
    loss = 0.0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        out = model(xb)
        c = out.shape[1]
        if confusion is None:
            confusion = torch.zeros(c * c, dtype=torch.int64)
        loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        confusion += torch.bincount((yb * c + out.argmax(1)).cpu(), minlength=c * c)
    model.train(was_training)
    if confusion is None:
        return {"accuracy": 0.0, "weighted_f1": 0.0, "macro_f1": 0.0, "loss": 0.0, "per_class_accuracy": []}
    cm = confusion.view(c, c).double()
    correct, total = cm.diagonal(), cm.sum(dim=1)
    n = max(int(total.sum()), 1)
    per_class = torch.where(total > 0, correct / total.clamp_min(1), torch.full_like(total, float("nan")))
    return {
        "accuracy": float(correct.sum()) / n,
        **f1_scores(cm.numpy()),
        "loss": loss / n,
        "per_class_accuracy": per_class.tolist(),
    }
