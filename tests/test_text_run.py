"""`gptfl run` end to end on text: a tiny MELD layout the test writes, utterances from the offline phrase-grammar
generator, text_cnn pretrained on them, 2 FedAvg rounds over the speakers, a report with weighted and macro F1."""

from __future__ import annotations

import pytest

from tests.test_text_data import write_meld

EMOTIONS = ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]
LINES = {
    "anger": "I can't believe you did that to me",
    "disgust": "Eww, that is so gross",
    "fear": "I'm scared, something is out there",
    "joy": "This is the best day ever",
    "neutral": "I'll meet you at the coffee house",
    "sadness": "I miss her so much",
    "surprise": "What? No way, really?",
}


@pytest.mark.slow
def test_gptfl_run_on_meld_reports_f1(tmp_path, ray_session):
    from gptfl_ray.config import validate_config
    from gptfl_ray.io import read_json, read_jsonl
    from gptfl_ray.run import run

    speakers = ["Ross", "Rachel", "Joey"]
    train = [(f"{LINES[e]} ({i})", speakers[i % 3], e, "neutral") for e in EMOTIONS for i in range(6)]
    test = [(LINES[e], speakers[i], e, "neutral") for e in EMOTIONS for i in range(2)]
    write_meld(tmp_path / "data" / "meld", train=train, test=test)
    cfg = validate_config(
        {
            "name": "meld-tiny",
            "data_dir": str(tmp_path / "data"),
            "data": {"dataset": "meld", "text": {"max_length": 16}},
            "partition": {"method": "natural"},
            "model": {"name": "text_cnn"},
            "prompts": {"num_per_class": 4},
            "generate": {"generator": "text-grammar", "batch_size": 28, "rows_per_shard": 28},
            "pretrain": {"epochs": 1, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 0.001}},
            "fl": {
                "rounds": 2,
                "clients_per_round": 2,
                "local": {"epochs": 1, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 0.001}},
                "num_actors": 1,
                "target_metric": "weighted_f1",
                "target_accuracy": 0.001,
            },
        },
        "meld-tiny",
    )
    run_dir = tmp_path / "run"
    out = run(cfg, run_dir)
    (synthetic,) = run_dir.glob("synthetic-*")
    manifest = read_json(synthetic / "manifest.json")
    assert manifest["kind"] == "text" and manifest["label_names"] == EMOTIONS
    (arm,) = out["results"]["arms"].values()
    folder = run_dir / arm["0"]["dir"]
    records = [r for r in read_jsonl(folder / "metrics.jsonl") if r.get("accuracy") is not None]
    assert [r["round"] for r in records] == [1, 2]
    assert all(0 < r["weighted_f1"] <= 1 and 0 < r["macro_f1"] <= 1 for r in records)
    summary = read_json(folder / "summary.json")
    assert summary["final_weighted_f1"] == records[-1]["weighted_f1"] and summary["rounds_to_target"] == 1
    assert summary["target_metric"] == "weighted_f1"
    (syn,) = out["results"]["synthetic_only"].values()
    assert 0 <= syn["real_test_weighted_f1"] <= 1 and 0 <= syn["real_test_macro_f1"] <= 1
    report = (run_dir / "report.md").read_text()
    assert "| weighted F1 % | macro F1 % |" in report and "Target weighted f1: 0%" in report
    assert (run_dir / "plots" / "weighted_f1_vs_round.png").is_file()
