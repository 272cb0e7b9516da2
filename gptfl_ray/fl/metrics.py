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


# What `fl.target_metric` may name: every evaluation reports all three.
TARGET_METRICS = ("accuracy", "weighted_f1", "macro_f1")


def f1_scores(confusion: np.ndarray) -> dict[str, float]:
    """Weighted and macro F1 of a confusion matrix (rows: true class, columns: predicted class).

    Equal to ``sklearn.metrics.f1_score(y_true, y_pred, average="weighted" | "macro")`` with its defaults: a
    class's F1 is 2·TP / (support + predicted), 0 where it has no true positive (``zero_division=0``); the macro
    mean is over the classes that occur among the true or the predicted labels, the weighted mean weighs each
    class by its support. Summing the matrices of test-set slices gives the whole set's scores exactly.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    seen = support + predicted
    f1 = np.divide(2 * tp, seen, out=np.zeros_like(tp), where=seen > 0)
    return {
        "weighted_f1": float((f1 * support).sum() / support.sum()) if support.sum() else 0.0,
        "macro_f1": float(f1[seen > 0].mean()) if (seen > 0).any() else 0.0,
    }


def eval_metrics(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine evaluation sums of test-set slices into accuracy, mean loss, per-class accuracy and (from their
    summed confusion matrices, where the parts have them) weighted and macro F1."""
    f1: dict[str, float | None] = {"weighted_f1": None, "macro_f1": None}
    if all("confusion" in p for p in parts):
        cm = np.sum([p["confusion"] for p in parts], axis=0)
        correct, count = np.diag(cm), cm.sum(axis=1)
        f1.update(f1_scores(cm))
    else:
        correct = np.sum([p["correct"] for p in parts], axis=0)
        count = np.sum([p["count"] for p in parts], axis=0)
    n = int(count.sum())
    loss = sum(p["loss_sum"] for p in parts)
    per_class = [float(c) / float(k) if k else None for c, k in zip(correct, count, strict=True)]
    return {
        "accuracy": float(correct.sum()) / max(n, 1),
        **f1,
        "loss": loss / max(n, 1),
        "per_class_accuracy": per_class,
    }


class Progress:
    """Running totals across rounds (part of the checkpoint, so a resumed run continues them). The target is a
    value of ``metric`` (``fl.target_accuracy`` of ``fl.target_metric``)."""

    def __init__(self, target: float | None, metric: str = "accuracy"):
        self.target = target
        self.metric = metric
        self.cum_bytes = 0
        self.elapsed_s = 0.0
        self.rounds_to_target: int | None = None
        self.mb_to_target: float | None = None

    def add_round(self, rec: dict[str, Any]) -> None:
        self.cum_bytes += rec["bytes_down"] + rec["bytes_up"]
        self.elapsed_s += rec["wall_time_s"]
        rec["cum_mb"] = self.cum_bytes / MB
        rec["elapsed_s"] = self.elapsed_s
        value = rec.get(self.metric)
        if (
            self.target is not None
            and self.rounds_to_target is None
            and value is not None
            and value >= self.target
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
        "final_weighted_f1": last.get("weighted_f1"),
        "final_macro_f1": last.get("macro_f1"),
        "final_loss": last.get("loss"),
        "best_accuracy": max((r["accuracy"] for r in evaluated), default=None),
        "best_weighted_f1": _best(evaluated, "weighted_f1"),
        "best_macro_f1": _best(evaluated, "macro_f1"),
        "rounds": records[-1]["round"] if records else 0,
        "target_accuracy": progress.target,
        "target_metric": progress.metric,
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


def _best(records: list[dict[str, Any]], key: str) -> float | None:
    return max((r[key] for r in records if r.get(key) is not None), default=None)


def isolated_summary(
    accuracies: list[float],
    *,
    weighted_f1: list[float | None] | None = None,
    macro_f1: list[float | None] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Client-isolated control: mean and (population) std of the clients' test accuracies (and F1s, if given)."""
    a = np.asarray(accuracies, dtype=float)
    out = {
        "isolated_mean_accuracy": float(a.mean()) if a.size else math.nan,
        "isolated_std_accuracy": float(a.std()) if a.size else math.nan,
        "isolated_accuracies": a.tolist(),
    }
    for name, values in (("weighted_f1", weighted_f1), ("macro_f1", macro_f1)):
        if values and all(v is not None for v in values):
            out[f"isolated_mean_{name}"] = float(np.mean(values))
            out[f"isolated_std_{name}"] = float(np.std(values))
    return {**out, **extra}
