"""Sweep configs validate; every tune config runs in --smoke mode; an interrupted sweep resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gptfl_ray.config import ConfigError, load_config
from gptfl_ray.sweep import grid_points, load_sweep

REPO = Path(__file__).resolve().parents[1]
TUNE_CONFIGS = sorted((REPO / "tune_configs").glob("*.yaml"))
RUN_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_configs_validate(path):
    from gptfl_ray.fl.runner import check_fl_config
    from gptfl_ray.generate.registry import get_generator

    cfg = load_config(path)
    get_generator(cfg.generate.generator).parse_options(cfg.generate.options)  # generator options too
    check_fl_config(cfg)  # strategy name + parameters


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.name)
def test_tune_configs_validate(path):
    for smoke in (False, True):
        sweep, run = load_sweep(path, smoke=smoke)
        points = grid_points(sweep, run)
        assert points and len({(p["arm"], p["seed"]) for p in points}) == len(points)
    assert len(points) <= 2  # smoke grids stay tiny


def test_bad_sweep_names_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: x\nbase: {REPO}/configs/smoke.yaml\ngrid:\n  fl.roundz: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"grid\.fl\.roundz.*unknown key"):
        load_sweep(bad)
    bad.write_text(f"name: x\nbase: {REPO}/configs/smoke.yaml\ngrdi: {{}}\n")
    with pytest.raises(ConfigError, match="grdi"):
        load_sweep(bad)


@pytest.mark.slow
@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.name)
def test_tune_config_runs_in_smoke_mode(path, tmp_path, ray_session, data_dir, tmp_path_factory):
    from gptfl_ray.sweep import sweep

    shared = tmp_path_factory.getbasetemp() / "sweep-shared"  # synthetic data + weights reused across sweeps
    sweep_cfg, run = load_sweep(path, smoke=True)
    out = sweep(sweep_cfg, run, tmp_path / "sweep", shared_dir=shared)
    assert out["errors"] == []
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    if sweep_cfg.kind == "federated":
        assert len(summary["rows"]) == len(grid_points(sweep_cfg, run))
        assert all(0 <= r["final_accuracy_mean"] <= 1 for r in summary["rows"])
    else:
        assert 0 <= summary["synthetic_only_mean"] <= 1
    assert (tmp_path / "sweep" / "report.md").is_file()


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning(tmp_path, data_dir, tmp_path_factory):
    sweep_dir = tmp_path / "sweep"
    env = {
        **os.environ,
        "GPTFL_DATA_DIR": str(data_dir),
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="rt", dir="/tmp"),
    }
    base = [
        sys.executable,
        "-m",
        "gptfl_ray.cli",
        "sweep",
        str(REPO / "tune_configs" / "quickstart.yaml"),
        "--smoke",
        "--output",
        str(sweep_dir),
        "--shared",  # the smoke tests above already built the synthetic data and weights
        str(tmp_path_factory.getbasetemp() / "sweep-shared"),
        "--set",
        "fl.rounds=4",
    ]
    proc = subprocess.Popen(
        base, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            if list((sweep_dir / "trials").glob("*/summary.json")):
                break
            time.sleep(0.5)
        assert proc.poll() is None, "sweep ended before it could be interrupted"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (finished,) = list((sweep_dir / "trials").glob("*/summary.json"))
    mtime = finished.stat().st_mtime_ns
    done = subprocess.run([*base, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert finished.stat().st_mtime_ns == mtime  # the finished trial was not rerun
    assert len(list((sweep_dir / "trials").glob("*/summary.json"))) == 2
    rows = json.loads((sweep_dir / "summary.json").read_text())["rows"]
    assert len(rows) == 2
