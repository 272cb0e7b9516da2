"""Knowledge-distillation pieces shared by the public-data strategies (FedDF, DS-FL, Fed-ET).

Everything here is a plain function of tensors and a seeded ``torch.Generator``, so a strategy's server step
is a function of (run seed, round) and resumes bit-identically.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def round_generator(seed: int, rnd: int, salt: int = 0) -> torch.Generator:
    """The generator of one server step: a function of (run seed, round, salt) only."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rnd, salt]).generate_state(1)[0]))


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``model``'s logits on ``x`` in eval mode (float32, on ``x``'s device); the model's mode is restored."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else x
    model.train(was_training)
    return out.float()


def kl_to_teacher(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher ‖ softmax(student / T)), mean over the batch (``F.kl_div(..., reduction="batchmean")``).

    ``teacher_probs`` are probabilities already at temperature T. No T² factor (FedDF's reference code).
    """
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_p, teacher_probs, reduction="batchmean")


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with soft targets, −Σ_c p_c·log softmax(logits)_c, mean over the batch."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def minibatches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``steps`` minibatch index sets over ``n`` samples: seeded epochs of a random permutation, cycled."""
    out: list[torch.Tensor] = []
    while len(out) < steps:
        order = torch.randperm(n, generator=generator)
        out += [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return out[:steps]
