"""Training primitives shared by pretraining and FL clients: optimizer from config, evaluation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from gptfl_ray.config import OptimizerConfig


def make_optimizer(params: Iterable[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> dict[str, Any]:
    """Accuracy, mean cross-entropy and per-class accuracy of ``model`` on (x, y)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    num_classes = None
    correct = torch.zeros(0)
    total = torch.zeros(0)
    loss = 0.0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        out = model(xb)
        if num_classes is None:
            num_classes = out.shape[1]
            correct, total = torch.zeros(num_classes), torch.zeros(num_classes)
        loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        hit = (out.argmax(1) == yb).float().cpu()
        correct.index_add_(0, yb.cpu(), hit)
        total.index_add_(0, yb.cpu(), torch.ones_like(hit))
    model.train(was_training)
    n = max(int(total.sum()), 1)
    per_class = torch.where(total > 0, correct / total.clamp_min(1), torch.full_like(total, float("nan")))
    return {"accuracy": float(correct.sum()) / n, "loss": loss / n, "per_class_accuracy": per_class.tolist()}
