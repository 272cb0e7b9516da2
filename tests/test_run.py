"""End-to-end `gptfl run` on the smoke config: artifacts, caching, resume; pretraining resume."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gptfl_ray.config import load_config
from gptfl_ray.io import read_json, read_jsonl

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ray_session, data_dir):
    from gptfl_ray.run import run

    run_dir = tmp_path_factory.mktemp("run") / "smoke"
    cfg = load_config(SMOKE)
    out = run(cfg, run_dir)
    return cfg, run_dir, out


def test_run_writes_every_artifact(finished_run):
    cfg, run_dir, out = finished_run
    assert (run_dir / "config.yaml").is_file()
    (synthetic,) = run_dir.glob("synthetic-*")
    manifest = read_json(synthetic / "manifest.json")
    assert manifest["complete"] and manifest["counts_per_class"] == [12] * 10
    (pre,) = run_dir.glob("pretrain-*-seed0")
    assert (pre / "weights.safetensors").is_file()
    pm = read_json(pre / "metrics.json")
    assert 0.0 <= pm["real_test_accuracy"] <= 1.0 and [h["epoch"] for h in pm["history"]] == list(
        range(cfg.pretrain.epochs)
    )
    arms = out["results"]["arms"]
    assert set(arms) == {"gptfl", "fedavg-scratch"}
    for arm in arms.values():
        folder = run_dir / arm["0"]["dir"]
        rounds = [r for r in read_jsonl(folder / "metrics.jsonl") if r.get("accuracy") is not None]
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert (folder / "final.safetensors").is_file()
    report = (run_dir / "report.md").read_text()
    assert "gptfl" in report and "fedavg-scratch" in report and "synthetic only" in report
    assert re.search(r"Wall time: \d+ s\.", report)  # a fresh run: the whole wall time
    for png in ("accuracy_vs_round.png", "accuracy_vs_mb.png", "grad_diversity.png"):
        assert (run_dir / "plots" / png).stat().st_size > 1000
    # the gptfl arm starts from the pretrained weights: its first evaluation beats the scratch arm's
    first = {
        name: read_jsonl(run_dir / a["0"]["dir"] / "metrics.jsonl")[0]["accuracy"] for name, a in arms.items()
    }
    assert first["gptfl"] > first["fedavg-scratch"]


def test_rerun_skips_finished_steps(finished_run, monkeypatch):
    import gptfl_ray.fl.runner
    import gptfl_ray.generate.pipeline
    import gptfl_ray.pretrain
    from gptfl_ray.run import run

    cfg, run_dir, first = finished_run

    def boom(*a, **k):
        raise AssertionError("a finished step ran again")

    monkeypatch.setattr(gptfl_ray.generate.pipeline, "generate", boom)
    monkeypatch.setattr(gptfl_ray.fl.runner, "run_federated", boom)
    monkeypatch.setattr(gptfl_ray.pretrain, "fit", boom)
    weights = next(run_dir.glob("pretrain-*-seed0")) / "weights.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = run(cfg, run_dir)
    assert weights.stat().st_mtime_ns == mtime
    assert again["results"]["arms"] == first["results"]["arms"]


def test_interrupted_run_resumes(tmp_path, data_dir):
    """Kill `gptfl run` once the first FL arm has checkpointed, then `--resume` finishes it."""
    run_dir = tmp_path / "interrupted"
    env = {
        **os.environ,
        "GPTFL_DATA_DIR": str(data_dir),
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="rt", dir="/tmp"),
    }
    cmd = [
        sys.executable,
        "-m",
        "gptfl_ray.cli",
        "run",
        str(SMOKE),
        "--output",
        str(run_dir),
        "--set",
        "fl.rounds=6",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            if list((run_dir / "fl").glob("gptfl-*/checkpoint")):
                break
            time.sleep(0.5)
        assert proc.poll() is None, "run ended before it could be interrupted"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    pres = sorted(run_dir.glob("pretrain-*-seed0"))
    assert len(pres) == 1, [p.name for p in pres]
    pre = pres[0]
    pre_mtime = (pre / "weights.safetensors").stat().st_mtime_ns
    assert not (run_dir / "report.md").exists()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptfl_ray.cli",
            "run",
            str(SMOKE),
            "--resume",
            str(run_dir),
            "--set",
            "fl.rounds=6",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Wall time" in (run_dir / "report.md").read_text()
    assert "this invocation only" in (run_dir / "report.md").read_text()  # not the whole run's time
    assert (pre / "weights.safetensors").stat().st_mtime_ns == pre_mtime  # pretraining not redone
    arms = sorted((run_dir / "fl").glob("gptfl-*"))
    assert len(arms) == 1, [a.name for a in arms]
    arm = arms[0]
    rounds = [r["round"] for r in read_jsonl(arm / "metrics.jsonl") if r.get("accuracy") is not None]
    assert rounds == list(range(1, 7))


def test_pretraining_resumes_from_checkpoint(finished_run, tmp_path, monkeypatch):
    """A pretraining stopped after its epoch-0 checkpoint continues from epoch 1 to the uninterrupted result."""
    from gptfl_ray.pretrain import pretrain
    from tests.test_pretrain import interrupt_after, same_weights, without_times

    cfg, run_dir, _ = finished_run
    synthetic = next(run_dir.glob("synthetic-*"))
    (full,) = run_dir.glob("pretrain-*-seed0")  # the run's own, uninterrupted pretraining
    out = tmp_path / "pre"
    interrupt_after(monkeypatch, epoch=0)
    with pytest.raises(Exception, match="interrupted after epoch 0"):
        pretrain(cfg, synthetic, out, seed=0)
    assert not (out / "weights.safetensors").exists()
    resumed = pretrain(cfg, synthetic, out, seed=0)
    assert resumed["resumed_from_epoch"] == 1
    assert without_times(resumed["history"]) == without_times(read_json(full / "metrics.json")["history"])
    assert same_weights(out, full)
