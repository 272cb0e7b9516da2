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

import numpy as np
import pytest

from gptfl_ray.config import ConfigError, load_config, validate_config
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
    assert len(points) <= max(2, len(sweep.arms))  # smoke grids stay tiny: one point per arm at most


def test_arms_cross_the_grid_with_their_own_overrides_init_and_seeds(tmp_path):
    sweep_file = tmp_path / "arms.yaml"
    sweep_file.write_text(
        f"""name: arms
base: {REPO}/configs/smoke.yaml
set: {{public_data: {{source: holdout, num: 50}}}}
arms:
  - {{name: gptfl, init: pretrained}}
  - {{name: feddf, set: {{fl.strategy: {{name: feddf, steps: 5}}}}}}
  - {{name: feddf-synthetic, set: {{fl.strategy.name: feddf, public_data.source: synthetic}}, seeds: [7]}}
grid:
  partition.alpha: [0.1, 0.5]
  seed: [0, 1]
"""
    )
    sweep, run = load_sweep(sweep_file)
    points = grid_points(sweep, run)
    got = sorted((p["arm"], p["seed"], p["init"]) for p in points)
    assert got == [
        ("feddf,alpha=0.1", 0, "random"),
        ("feddf,alpha=0.1", 1, "random"),
        ("feddf,alpha=0.5", 0, "random"),
        ("feddf,alpha=0.5", 1, "random"),
        ("feddf-synthetic,alpha=0.1", 7, "random"),
        ("feddf-synthetic,alpha=0.5", 7, "random"),
        ("gptfl,alpha=0.1", 0, "pretrained"),
        ("gptfl,alpha=0.1", 1, "pretrained"),
        ("gptfl,alpha=0.5", 0, "pretrained"),
        ("gptfl,alpha=0.5", 1, "pretrained"),
    ]
    by_arm = {p["arm"]: p["run"] for p in points}
    assert by_arm["feddf,alpha=0.5"]["fl"]["strategy"] == {"name": "feddf", "steps": 5}
    assert by_arm["feddf,alpha=0.5"]["partition"]["alpha"] == 0.5
    assert by_arm["feddf-synthetic,alpha=0.1"]["public_data"] == {"source": "synthetic", "num": 50, "seed": 0}
    assert by_arm["gptfl,alpha=0.1"]["fl"]["strategy"] == {"name": "fedavg"}
    # an arm whose overrides do not validate, or a repeated arm name, is refused naming it
    sweep_file.write_text(sweep_file.read_text().replace("steps: 5", "steps: 0"))
    with pytest.raises(ConfigError, match=r"fl\.strategy\.steps: Input should be greater than 0 \(feddf\)"):
        grid_points(*load_sweep(sweep_file))
    sweep_file.write_text(sweep_file.read_text().replace("name: feddf-synthetic", "name: feddf"))
    with pytest.raises(ConfigError, match=r"arms: duplicate arm name 'feddf'"):
        load_sweep(sweep_file)


def test_bad_sweep_names_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: x\nbase: {REPO}/configs/smoke.yaml\ngrid:\n  fl.roundz: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"grid\.fl\.roundz.*unknown key"):
        load_sweep(bad)
    bad.write_text(f"name: x\nbase: {REPO}/configs/smoke.yaml\ngrdi: {{}}\n")
    with pytest.raises(ConfigError, match="grdi"):
        load_sweep(bad)


def test_synthetic_only_report_keeps_every_grid_point(tmp_path):
    from gptfl_ray.report import write_report
    from gptfl_ray.sweep import sweep_results

    sweep_cfg, run = load_sweep(REPO / "tune_configs" / "zero-shot.yaml")  # prompts.scale: [1, 2] × 3 seeds
    points = grid_points(sweep_cfg, run)
    for p in points:  # as build_shared leaves them: each point's own pretrained model on the real test set
        p["synthetic_only"] = 0.1 * p["run"]["prompts"]["scale"] + 0.01 * p["seed"]
        p["trial_dir"] = str(tmp_path / "trials" / f"{p['arm']}-{p['seed']}")
    write_report(tmp_path, sweep_results(sweep_cfg, run, points, tmp_path))
    rows = json.loads((tmp_path / "summary.json").read_text())["synthetic_only"]
    assert [(r["arm"], r["seeds"]) for r in rows] == [
        ("init=pretrained,scale=1", 3),
        ("init=pretrained,scale=2", 3),
    ]
    assert [r["mean"] for r in rows] == [pytest.approx(0.11), pytest.approx(0.21)]
    report = (tmp_path / "report.md").read_text()
    assert "| synthetic only (no FL): init=pretrained,scale=1 | 11.00 ± 0.82 |" in report
    assert "| synthetic only (no FL): init=pretrained,scale=2 | 21.00 ± 0.82 |" in report


def test_isolated_trial_reports_its_accuracy_to_tune(tmp_path, ray_session):
    from ray import tune

    from gptfl_ray.fl.metrics import isolated_summary
    from gptfl_ray.io import atomic_write_json
    from gptfl_ray.sweep import fl_trial

    trial = tmp_path / "trial"  # a finished client-isolated trial: fl_trial reports its summary
    trial.mkdir()
    atomic_write_json(
        trial / "summary.json", isolated_summary([0.5, 0.8], mode="isolated", strategy="isolated")
    )
    point = {"kind": "federated", "trial_dir": str(trial), "run": {}, "seed": 0}
    tuner = tune.Tuner(
        fl_trial,
        param_space={"point": point},
        run_config=tune.RunConfig(name="isolated", storage_path=str(tmp_path / "tune")),
    )
    (result,) = tuner.fit()
    assert result.error is None
    assert result.metrics["accuracy"] == pytest.approx(0.65)


# The CIFAR baseline sweeps have baselines-mnist's arms and, in smoke mode, the same substitute data and models:
# running them too would repeat its trials (test_tune_configs_validate checks their smoke grids).
# baselines-flowers102 runs on a tiny Flowers102 layout of its own (test below).
SMOKE_RUNS = [
    p
    for p in TUNE_CONFIGS
    if p.name not in ("baselines-cifar10.yaml", "baselines-cifar100.yaml", "baselines-flowers102.yaml")
]


@pytest.mark.slow
@pytest.mark.parametrize("path", SMOKE_RUNS, ids=lambda p: p.name)
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


def write_tiny_flowers102(data_dir: Path) -> None:
    """torchvision's Flowers102 layout with 102 classes × 2 train, 1 val and 1 test image (small random JPEGs of
    two sizes: the loader resizes and centre-crops them)."""
    from PIL import Image
    from scipy.io import savemat

    base = data_dir / "flowers102" / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 102 * 4
    labels = np.repeat(np.arange(1, 103), 4)  # 1-based, as the released file
    for i in range(1, n + 1):
        size = (48, 40) if i % 2 else (40, 56)
        pixels = (rng.random((size[1], size[0], 3)) * 100 + 1.5 * labels[i - 1]).astype(np.uint8)
        Image.fromarray(pixels).save(base / "jpg" / f"image_{i:05d}.jpg")
    savemat(base / "imagelabels.mat", {"labels": labels})
    ids = np.arange(1, n + 1)
    savemat(
        base / "setid.mat",
        {"trnid": ids[0::4], "valid": ids[1::4], "tstid": np.concatenate([ids[2::4], ids[3::4]])},
    )


def test_flowers102_reads_torchvision_layout_at_the_configured_size(tmp_path):
    from gptfl_ray.data import load_dataset
    from gptfl_ray.data.base import get_spec
    from gptfl_ray.errors import UserError

    write_tiny_flowers102(tmp_path)
    cfg = validate_config(
        {"data": {"dataset": "flowers102", "test_split": "official", "image_size": 32}}
    ).data
    splits = load_dataset(cfg, tmp_path)
    assert splits.train.x.shape == (204, 32, 32, 3) and splits.test.x.shape == (204, 32, 32, 3)
    assert splits.train.y[:3].tolist() == [0, 1, 2]  # train ids 1, 5, 9: labels 1, 2, 3 in the 1-based file
    assert splits.test.class_counts().tolist() == [2] * 102
    assert get_spec(cfg).image_size == 32 and get_spec("flowers102").image_size == 224
    (tmp_path / "flowers102" / "flowers-102" / "jpg" / "image_00003.jpg").unlink()
    with pytest.raises(UserError, match="flowers102 missing under") as err:
        load_dataset(cfg, tmp_path)
    assert "\n" not in str(err.value) and "image_00003.jpg" in str(err.value)


@pytest.mark.slow
def test_baselines_flowers102_runs_in_smoke_mode_on_a_tiny_layout(tmp_path, ray_session):
    """GPT-FL, FedAvg, FedGen and DynaFed on Flowers102-shaped data (102 classes, RGB, resized to 32×32),
    2 rounds each: the ConvNet arms. The VGG19 arms take ~8 more minutes on 2 cores (DynaFed unrolls VGG19:
    6.5 min alone), so the suite leaves them to `gptfl sweep tune_configs/baselines-flowers102.yaml --smoke`."""
    from gptfl_ray.sweep import sweep

    data_dir = tmp_path / "data"
    write_tiny_flowers102(data_dir)
    sweep_cfg, run = load_sweep(
        REPO / "tune_configs" / "baselines-flowers102.yaml", [f"data_dir={data_dir}"], smoke=True
    )
    convnet = [a for a in sweep_cfg.arms if a.name.endswith("-convnet")]
    assert len(convnet) == 4 and len(sweep_cfg.arms) == 8
    sweep_cfg = sweep_cfg.model_copy(update={"arms": convnet})
    out = sweep(sweep_cfg, run, tmp_path / "sweep", shared_dir=tmp_path / "shared")
    assert out["errors"] == []
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert {r["arm"] for r in summary["rows"]} == {
        f"{m}-convnet" for m in ("gptfl", "fedavg", "fedgen", "dynafed")
    }
    assert all(0 <= r["final_accuracy_mean"] <= 1 for r in summary["rows"])


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
