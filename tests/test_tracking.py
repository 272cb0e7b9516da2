"""MLflow tracking of `gptfl run` (read back with the MLflow client) and of sweeps (params, callback); a rerun's
MLflow runs and the quiet console are tested in test_run.py."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from gptfl_ray.config import load_config
from gptfl_ray.io import read_json, read_jsonl
from gptfl_ray.tracking import RUN_ID_FILE, Tracker, config_params, numeric_fields, tracking_callbacks

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def _client(uri: str):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def mlflow_runs(cfg, run_dir: Path):
    """(MLflow client, {run name: run}) of a finished run's own file store."""
    client = _client((run_dir / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name(cfg.name)
    return client, {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


@pytest.mark.slow
def test_mlflow_store_holds_params_metrics_and_artifacts(smoke_run):
    cfg, run_dir, out = smoke_run
    client, runs = mlflow_runs(cfg, run_dir)
    assert set(runs) == {"smoke", "pretrain-seed0", "gptfl-seed0", "fedavg-scratch-seed0"}
    parent = runs["smoke"]
    # params: the flattened config, dotted keys
    assert parent.data.params["fl.rounds"] == "3"
    assert parent.data.params["model.name"] == "convnet"
    assert parent.data.params["partition.alpha"] == "0.5"
    assert parent.data.params["fl.local.batch_size"] == "16"
    for name in ("pretrain-seed0", "gptfl-seed0", "fedavg-scratch-seed0"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert runs[name].info.status == "FINISHED"
    # per-round metrics of each arm: the metrics.jsonl values at step = round
    for arm in ("gptfl", "fedavg-scratch"):
        run_id = runs[f"{arm}-seed0"].info.run_id
        folder = run_dir / out["results"]["arms"][arm]["0"]["dir"]
        assert read_json(folder / RUN_ID_FILE)["run_id"] == run_id
        assert runs[f"{arm}-seed0"].data.params["arm"] == arm
        records = read_jsonl(folder / "metrics.jsonl")
        for key in ("accuracy", "loss", "cum_mb", "bytes_up", "train_loss"):
            hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            assert hist == [(r["round"], pytest.approx(r[key])) for r in records if r.get(key) is not None]
        assert [m.step for m in client.get_metric_history(run_id, "accuracy")] == [1, 2, 3]
    # per-epoch pretraining metrics at step = epoch
    pre = runs["pretrain-seed0"].info.run_id
    (pre_dir,) = run_dir.glob("pretrain-*-seed0")
    history = read_json(pre_dir / "metrics.json")["history"]
    hist = sorted((m.step, m.value) for m in client.get_metric_history(pre, "train_loss"))
    assert hist == [(h["epoch"], pytest.approx(h["train_loss"])) for h in history] and len(hist) == 8
    assert client.get_metric_history(pre, "final.real_test_accuracy")
    # the report and plots as artifacts of the parent run
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "report.md" in names and "plots" in names
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/accuracy_vs_round.png" in plots


# ------------------------------------------------------------------------------------------ no Ray
def test_params_and_metrics_are_flattened():
    params = config_params({"fl": {"rounds": 3, "local": {"lr": 0.1}}, "seeds": [0, 1], "x": "y" * 7000})
    assert params["fl.rounds"] == "3" and params["fl.local.lr"] == "0.1" and params["seeds"] == "[0, 1]"
    assert len(params["x"]) == 6000  # MLflow's value limit
    rec = {"round": 2, "accuracy": 0.5, "skipped": False, "sampled": [1], "info": {"kl": 1.5}, "n": None}
    assert numeric_fields(rec, skip=("round",)) == {"accuracy": 0.5, "info.kl": 1.5}


def test_tracking_failure_warns_once_and_never_raises(tmp_path, caplog):
    cfg = load_config(SMOKE, ["tracking.mlflow.uri=nosuchscheme://nowhere"])
    tracker = Tracker(cfg, tmp_path)
    with caplog.at_level(logging.WARNING, logger="gptfl_ray.tracking"):
        tracker.start()
        tracker.start_arm("gptfl", cfg, 0, tmp_path / "arm")
        tracker.log_arm("gptfl", cfg, 0, tmp_path / "arm")
        tracker.finish(None)
    assert not tracker.enabled
    assert len([r for r in caplog.records if "MLflow tracking off" in r.message]) == 1


def test_disabled_tracking_writes_nothing(tmp_path):
    cfg = load_config(SMOKE, ["tracking.mlflow.enabled=false"])
    tracker = Tracker(cfg, tmp_path)
    tracker.start()
    tracker.log_pretrain(0, tmp_path / "pre", {"history": [{"epoch": 0, "train_loss": 1.0}]})
    assert list(tmp_path.iterdir()) == []
    assert tracking_callbacks(cfg, tmp_path, "s") == []


def test_sweep_param_space_has_flat_keys():
    from ray import tune
    from ray.tune.search.variant_generator import generate_variants

    from gptfl_ray.sweep import flat_param_space

    sweep_cfg = SimpleNamespace(grid={"partition.alpha": [0.1, 1.0], "seed": [0]}, arms=[])
    points = [
        {"arm": f"init=random,alpha={a}", "seed": 0, "init": "random", "run": {"partition": {"alpha": a}}}
        for a in (0.1, 1.0)
    ]
    space = {"point": tune.grid_search(points), **flat_param_space(sweep_cfg, points)}
    configs = [v["config"] for _, v in generate_variants({"config": space})]
    flat = [{k: v for k, v in c.items() if k != "point"} for c in configs]
    assert flat == [
        {"arm": "init=random,alpha=0.1", "seed": 0, "init": "random", "partition.alpha": 0.1},
        {"arm": "init=random,alpha=1.0", "seed": 0, "init": "random", "partition.alpha": 1.0},
    ]


def test_sweep_mlflow_callback_logs_flat_params_and_results(tmp_path):
    cfg = load_config(SMOKE)
    (callback,) = tracking_callbacks(cfg, tmp_path, "sweep-x")
    callback.setup()
    trial = _Trial(
        {"point": {"run": {"huge": "x" * 100}}, "arm": "fedavg", "seed": 1, "fl.rounds": 2}, tmp_path
    )
    callback.log_trial_start(trial)
    callback.log_trial_result(1, trial, {"accuracy": 0.1, "round": 1, "training_iteration": 1})
    # `gptfl sweep --resume`: a new callback (a new process) sees the restored trial; Tune's iteration count
    # starts again at 1, the FL run resumes at round 2
    (callback,) = tracking_callbacks(cfg, tmp_path, "sweep-x")
    callback.setup()
    callback.log_trial_start(trial)
    callback.log_trial_result(1, trial, {"accuracy": 0.2, "round": 2, "training_iteration": 1})
    callback.log_trial_end(trial)
    client = _client((tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("sweep-x").experiment_id])  # one run
    assert run.data.params == {"arm": "fedavg", "seed": "1", "fl.rounds": "2"}  # not the grid point blob
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "accuracy")] == [
        (1, pytest.approx(0.1)),
        (2, pytest.approx(0.2)),
    ]


def test_sweep_mlflow_callback_whose_setup_failed_stays_off(tmp_path, monkeypatch):
    """A restored sweep's pickled callback set up without the file store allowed: tracking goes off with a
    warning, and results keep flowing (it used to raise AttributeError and end the sweep)."""
    cfg = load_config(SMOKE)
    (callback,) = tracking_callbacks(cfg, tmp_path, "sweep-y")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    callback.setup()
    trial = _Trial({"arm": "fedavg", "seed": 0}, tmp_path)
    callback.log_trial_start(trial)
    callback.log_trial_result(1, trial, {"accuracy": 0.1, "round": 1})
    callback.log_trial_end(trial)
    assert callback._off


class _Trial:
    """The parts of a Tune Trial the MLflow callback reads."""

    def __init__(self, config, local_path, trial_id="a1b2c3d4_00000"):
        self.config, self.local_path, self.trial_id = config, str(local_path), trial_id

    def __str__(self) -> str:
        return "trial_0"
