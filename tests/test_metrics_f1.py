"""Weighted and macro F1 from summed confusion matrices: hand-computed values on fixed predictions (scikit-learn
is not a dependency; each expected value below is what ``sklearn.metrics.f1_score(y_true, y_pred, average=...)``
gives, worked out by hand), slices that add up exactly, ``fl.target_metric`` and the report's F1 columns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gptfl_ray.fl.client import evaluate_sums
from gptfl_ray.fl.metrics import Progress, eval_metrics, f1_scores, summarize
from gptfl_ray.training import evaluate


def _confusion(y_true, y_pred, num_classes):
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def test_f1_matches_hand_computation():
    # class 0: TP 1, support 2, predicted 2 -> F1 2/4; class 1: TP 2, support 2, predicted 4 -> 4/6;
    # class 2: TP 1, support 3, predicted 1 -> 2/4. Macro (1/2 + 2/3 + 1/2) / 3 = 5/9;
    # weighted (2·1/2 + 2·2/3 + 3·1/2) / 7 = 23/42.
    y_true, y_pred = [0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 0, 1]
    f1 = f1_scores(_confusion(y_true, y_pred, 3))
    assert f1["macro_f1"] == pytest.approx(5 / 9) and f1["weighted_f1"] == pytest.approx(23 / 42)


def test_f1_classes_absent_or_only_predicted():
    # 4 classes: class 2 never occurs (left out of the macro mean, as sklearn's default labels do); class 3 is
    # predicted once but never true: F1 0 in the macro mean, weight 0 in the weighted one.
    # class 0: TP 1, support 2, predicted 1 -> 2/3; class 1: TP 1, support 1, predicted 1 -> 1.
    f1 = f1_scores(_confusion([0, 0, 1], [0, 3, 1], 4))
    assert f1["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert f1["weighted_f1"] == pytest.approx((2 * 2 / 3 + 1 * 1) / 3)
    assert f1_scores(np.zeros((3, 3))) == {"weighted_f1": 0.0, "macro_f1": 0.0}


def test_slices_add_up_and_evaluators_agree():
    """Evaluation sums of two test-set slices give the whole set's accuracy and F1 exactly; the server-side
    ``training.evaluate`` (pretraining's real-test numbers) gives the same from the same model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4))
    x, y = torch.randn(50, 5), torch.randint(0, 4, (50,))
    pred = model(x).argmax(1)
    whole = f1_scores(_confusion(y.numpy(), pred.numpy(), 4))
    parts = [evaluate_sums(model, x[:17], y[:17], 4, 8), evaluate_sums(model, x[17:], y[17:], 4, 8)]
    m = eval_metrics(parts)
    assert m["weighted_f1"] == pytest.approx(whole["weighted_f1"]) and m["macro_f1"] == pytest.approx(
        whole["macro_f1"]
    )
    assert m["accuracy"] == pytest.approx(float((pred == y).float().mean()))
    ev = evaluate(model, x, y, batch_size=16)
    assert (ev["accuracy"], ev["weighted_f1"], ev["macro_f1"]) == pytest.approx(
        (m["accuracy"], m["weighted_f1"], m["macro_f1"])
    )
    # sums without confusion matrices (older parts) still give accuracy, and no F1
    old = eval_metrics([{k: p[k] for k in ("loss_sum", "correct", "count")} for p in parts])
    assert old["accuracy"] == m["accuracy"] and old["weighted_f1"] is None


def test_target_metric_decides_rounds_to_target():
    records = [
        {"round": 1, "accuracy": 0.7, "weighted_f1": 0.4, "macro_f1": 0.2},
        {"round": 2, "accuracy": 0.7, "weighted_f1": 0.6, "macro_f1": 0.3},
    ]
    for metric, reached in (("accuracy", 1), ("weighted_f1", 2), ("macro_f1", None)):
        progress = Progress(0.5, metric)
        for r in records:
            progress.add_round({**r, "bytes_down": 1_000_000, "bytes_up": 0, "wall_time_s": 1.0})
        assert progress.rounds_to_target == reached, metric
    s = summarize(
        [{**r, "rejected": [], "failed_clients": []} for r in records],
        progress,
        strategy="fedavg",
        seed=0,
        init="x",
    )
    assert (s["final_weighted_f1"], s["best_weighted_f1"], s["final_macro_f1"]) == (0.6, 0.6, 0.3)
    assert s["target_metric"] == "macro_f1"


def test_target_metric_config(tmp_path):
    from gptfl_ray.config import ConfigError, dump_config, validate_config

    cfg = validate_config({"fl": {"target_metric": "weighted_f1", "target_accuracy": 0.4}})
    assert dump_config(cfg)["fl"]["target_metric"] == "weighted_f1"
    assert "target_metric" not in dump_config(validate_config({}))["fl"]  # default: earlier keys unchanged
    with pytest.raises(ConfigError, match=r"fl\.target_metric: Input should be 'accuracy', 'weighted_f1' or"):
        validate_config({"fl": {"target_metric": "f1"}})


def test_report_shows_f1_next_to_accuracy(tmp_path):
    from gptfl_ray.report import write_report

    for name, acc, f1 in (("a0", 0.5, 0.4), ("a1", 0.7, 0.6)):
        folder = tmp_path / name
        folder.mkdir()
        summary = {
            "final_accuracy": acc,
            "final_weighted_f1": f1,
            "final_macro_f1": f1 / 2,
            "best_accuracy": acc,
        }
        (folder / "summary.json").write_text(json.dumps({**summary, "total_mb": 1.0}))
        rec = {"round": 1, "accuracy": acc, "weighted_f1": f1, "macro_f1": f1 / 2, "cum_mb": 1.0}
        (folder / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    results = {
        "name": "t",
        "seeds": [0, 1],
        "arms": {"gptfl": {"0": {"dir": "a0"}, "1": {"dir": "a1"}}},
        "synthetic_only": {
            "0": {"real_test_accuracy": 0.3, "real_test_weighted_f1": 0.2, "real_test_macro_f1": 0.1}
        },
        "target_accuracy": 0.5,
        "target_metric": "weighted_f1",
    }
    write_report(tmp_path, results)
    text = (tmp_path / "report.md").read_text()
    assert "| arm | final acc % (mean ± std) | weighted F1 % | macro F1 % | best acc % |" in text
    assert "| gptfl | 60.00 ± 10.00 | 50.00 ± 10.00 | 25.00 ± 5.00 | 60.00 ± 10.00 |" in text
    assert "| synthetic only (no FL) | 30.00 | 20.00 | 10.00 | – |" in text
    assert "Target weighted f1: 50%" in text
    assert (tmp_path / "plots" / "weighted_f1_vs_round.png").is_file()
    (row,) = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert row["final_weighted_f1_mean"] == pytest.approx(0.5) and row["final_macro_f1_std"] == pytest.approx(
        0.05
    )
