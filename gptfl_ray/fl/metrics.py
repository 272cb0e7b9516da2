"""Per-round metrics (communication, evaluation) and the run summary.

Communication is counted as the protocol would send it, in float32: downlink = the global weights plus the
strategy's broadcast extras per dispatched task (re-dispatches included), uplink = the update plus the
strategy's extra uploads per received result (rejected ones included). MB = 10⁶ bytes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BYTES_PER_VALUE = 4  # float32
MB = 1e6


def eval_metrics(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine evaluation sums of test-set slices into accuracy, mean loss and per-class accuracy."""
    correct = np.sum([p["correct"] for p in parts], axis=0)
    count = np.sum([p["count"] for p in parts], axis=0)
    n = int(count.sum())
    loss = sum(p["loss_sum"] for p in parts)
    per_class = [float(c) / float(k) if k else None for c, k in zip(correct, count, strict=True)]
    return {
        "accuracy": float(correct.sum()) / max(n, 1),
        "loss": loss / max(n, 1),
        "per_class_accuracy": per_class,
    }


class Progress:
    """Running totals across rounds (part of the checkpoint, so a resumed run continues them)."""

    def __init__(self, target: float | None):
        self.target = target
        self.cum_bytes = 0
        self.elapsed_s = 0.0
        self.rounds_to_target: int | None = None
        self.mb_to_target: float | None = None

    def add_round(self, rec: dict[str, Any]) -> None:
        self.cum_bytes += rec["bytes_down"] + rec["bytes_up"]
        self.elapsed_s += rec["wall_time_s"]
        rec["cum_mb"] = self.cum_bytes / MB
        rec["elapsed_s"] = self.elapsed_s
        acc = rec.get("accuracy")
        if (
            self.target is not None
            and self.rounds_to_target is None
            and acc is not None
            and acc >= self.target
        ):
            self.rounds_to_target = rec["round"]
            self.mb_to_target = rec["cum_mb"]

    def state(self) -> dict[str, Any]:
        return dict(vars(self))

    def load(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


def summarize(
    records: list[dict[str, Any]], progress: Progress, *, strategy: str, seed: int, init: str
) -> dict[str, Any]:
    evaluated = [r for r in records if r.get("accuracy") is not None]
    last = evaluated[-1] if evaluated else {}
    return {
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        "best_accuracy": max((r["accuracy"] for r in evaluated), default=None),
        "rounds": records[-1]["round"] if records else 0,
        "target_accuracy": progress.target,
        "rounds_to_target": progress.rounds_to_target,
        "mb_to_target": progress.mb_to_target,
        "total_mb": progress.cum_bytes / MB,
        "wall_time_s": progress.elapsed_s,
        "per_class_accuracy": last.get("per_class_accuracy"),
        "strategy": strategy,
        "seed": seed,
        "init": init,
        "rejected_updates": sum(len(r["rejected"]) for r in records),
        "failed_clients": sum(len(r["failed_clients"]) for r in records),
        "skipped_rounds": [r["round"] for r in records if r.get("skipped")],
    }


def isolated_summary(accuracies: list[float], **extra: Any) -> dict[str, Any]:
    """Client-isolated control: mean and (population) std of the clients' test accuracies."""
    a = np.asarray(accuracies, dtype=float)
    return {
        "isolated_mean_accuracy": float(a.mean()) if a.size else math.nan,
        "isolated_std_accuracy": float(a.std()) if a.size else math.nan,
        "isolated_accuracies": a.tolist(),
        **extra,
    }
