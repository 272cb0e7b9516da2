"""Server-side handling of client updates: validation, the weighted sum, gradient diversity."""

from __future__ import annotations

import torch


def check_vector(vec: torch.Tensor, size: int, max_norm: float | None = None) -> tuple[str | None, float]:
    """(reason to reject or None, L2 norm). Rejects wrong shape/dtype, NaN/Inf, and norms above ``max_norm``."""
    if vec.dtype != torch.float32 or vec.shape != (size,):
        return f"wrong shape/dtype {tuple(vec.shape)} {vec.dtype} (expected ({size},) float32)", float("nan")
    # float64 norm: cannot overflow, and it is non-finite exactly when some entry is NaN/Inf.
    norm = float(torch.linalg.vector_norm(vec, dtype=torch.float64))
    if not torch.isfinite(torch.tensor(norm)):
        return "non-finite values (NaN/Inf)", norm
    if max_norm is not None and norm > max_norm:
        return f"norm {norm:.4g} above fl.max_update_norm={max_norm:g}", norm
    return None, norm


class WeightedSum:
    """Σ_i [w_i·Δ_i, w_i] over accepted client vectors: all that FedAvg-family aggregation needs.

    Secure aggregation replaces this class by a masked sum of the same ``[w·Δ, w]`` vectors (the server
    then learns only the sum). Vectors are added in the round's sampled order, so the result does not
    depend on which client finished first.
    """

    def __init__(self, size: int):
        self.total = torch.zeros(size)
        self.weight = 0.0
        self.count = 0

    def add(self, vec: torch.Tensor, weight: float) -> None:
        self.total.add_(vec, alpha=weight)
        self.weight += weight
        self.count += 1

    def mean(self) -> torch.Tensor | None:
        return self.total / self.weight if self.weight > 0 else None


class GradientDiversity:
    """Gradient diversity (Yin et al. 2018, Definition 1) of the round's K accepted client updates Δ_i:

        Σ_i ‖Δ_i‖² / ‖Σ_i Δ_i‖²    (plain sums: no sample weights; updates in place of the paper's gradients)

    1/K when all K updates are identical (the minimum), 1 when they are pairwise orthogonal, above 1 when they
    partly cancel out (client drift under non-IID data shows here); None when they sum to exactly zero.
    """

    def __init__(self, size: int):
        self.sum = torch.zeros(size, dtype=torch.float64)
        self.sq_norms = 0.0

    def add(self, vec: torch.Tensor, norm: float) -> None:
        self.sum.add_(vec)
        self.sq_norms += norm * norm

    def value(self) -> float | None:
        denom = float(self.sum.dot(self.sum))
        return self.sq_norms / denom if denom > 0 else None
