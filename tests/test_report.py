"""The report's table: per-arm means over seeds, including the per-round time and the server's share."""

from __future__ import annotations

import json

import pytest

from gptfl_ray.report import write_report


def _arm(folder, accuracy, rounds):
    """An arm folder as the FL runner leaves it: summary.json and one metrics.jsonl record per round."""
    folder.mkdir(parents=True)
    summary = {"final_accuracy": accuracy, "best_accuracy": accuracy, "total_mb": 2.0, "rounds": len(rounds)}
    (folder / "summary.json").write_text(json.dumps(summary))
    records = [
        {
            "round": i + 1,
            "accuracy": accuracy,
            "cum_mb": i + 1.0,
            "wall_time_s": wall,
            "server_time_s": server,
        }
        for i, (wall, server) in enumerate(rounds)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_table_has_round_time_and_server_share_averaged_over_rounds_and_seeds(tmp_path):
    _arm(tmp_path / "a0", 0.5, [(1.0, 0.25), (3.0, 0.75)])
    _arm(tmp_path / "a1", 0.7, [(2.0, 0.5), (2.0, 0.5)])
    results = {"name": "t", "seeds": [0, 1], "arms": {"feddf": {"0": {"dir": "a0"}, "1": {"dir": "a1"}}}}
    write_report(tmp_path, results)
    (row,) = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert row["round_s"] == pytest.approx(2.0) and row["server_s"] == pytest.approx(0.5)
    assert (
        "| feddf | 60.00 ± 10.00 | 60.00 ± 10.00 | – | – | 2.0 | 2.00 (0.50) |"
        in (tmp_path / "report.md").read_text()
    )


def test_an_arm_without_traffic_counts_shows_a_dash_not_nan(tmp_path):
    """A client-isolated arm's summary has no total_mb (no model is exchanged): the table says "–"."""
    _arm(tmp_path / "iso", 0.5, [(1.0, 0.0)])
    summary = json.loads((tmp_path / "iso" / "summary.json").read_text())
    del summary["total_mb"]
    (tmp_path / "iso" / "summary.json").write_text(json.dumps(summary))
    write_report(tmp_path, {"name": "t", "seeds": [0], "arms": {"isolated": {"0": {"dir": "iso"}}}})
    report = (tmp_path / "report.md").read_text()
    assert "| isolated | 50.00 | 50.00 | – | – | – | 1.00 (0.00) |" in report and "nan" not in report
