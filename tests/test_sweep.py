"""Sweep configs: every grid point validates (and its data, where this machine has it); three tune configs,
baselines-flowers102's ConvNet arms and a synthetic-public-data arm run in --smoke mode (quickstart's as an
interrupted `gptfl sweep` that resumes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gptfl_ray.config import ConfigError, RunConfig, load_config, validate_config
from gptfl_ray.sweep import grid_points, load_sweep
from tests.session_ray import wait_for_released_cpus

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
    """Every grid point of the full and the smoke grid passes what its trial checks before doing any work, with
    no data read: grid_points builds each point's RunConfig (arm, grid values, seed) and runs validate_run on it for
    the steps its trial runs (labels, generator and its options, prompt table; the model and any fl.client_model
    built for the dataset's input shape and class count on the meta device; the FL strategy and its parameters,
    public data, secure aggregation). The trial's own copy of the config and its resources build too."""
    from gptfl_ray.sweep import flat_params, trial_resources

    for smoke in (False, True):
        sweep, run = load_sweep(path, smoke=smoke)
        points = grid_points(sweep, run)
        assert points and len({(p["arm"], p["seed"]) for p in points}) == len(points)
        for p in points:  # fl_trial rebuilds its config from the point: the same config
            assert RunConfig.model_validate(p["run"]).model_dump(mode="json") == p["run"]
            assert flat_params(sweep, p)["seed"] == p["seed"]  # the trial's Tune params
        resources = trial_resources(run).required_resources  # the trial's placement group: its actors' CPUs
        assert resources["CPU"] == pytest.approx(run.fl.num_actors * run.fl.actor_num_cpus)
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


def test_isolated_trial_reports_its_accuracy_to_tune_and_the_report(tmp_path, ray_session):
    """isolated.yaml's smoke point: a finished client-isolated trial (as run_isolated leaves it; the training
    itself: test_fl_runtime.py::test_isolated_control) reports its clients' mean accuracy to Tune, and the sweep's
    report has it as the grid point's row."""
    from ray import tune

    from gptfl_ray.fl.metrics import isolated_summary
    from gptfl_ray.io import append_jsonl, atomic_write_json
    from gptfl_ray.report import write_report
    from gptfl_ray.sweep import fl_trial, sweep_results

    sweep_cfg, run = load_sweep(REPO / "tune_configs" / "isolated.yaml", smoke=True)
    (point,) = grid_points(sweep_cfg, run)
    assert point["run"]["fl"]["mode"] == "isolated" and point["init"] == "pretrained"
    sweep_dir = tmp_path / "sweep"
    trial = sweep_dir / "trials" / "isolated-seed0"
    trial.mkdir(parents=True)
    for client, acc in ((4, 0.5), (1, 0.8)):
        append_jsonl(
            trial / "metrics.jsonl", {"client": client, "accuracy": acc, "num_samples": 90, "epochs": 5}
        )
    atomic_write_json(
        trial / "summary.json",
        isolated_summary([0.5, 0.8], mode="isolated", strategy="isolated", isolated_clients=[4, 1]),
    )
    point.update(kind=sweep_cfg.kind, trial_dir=str(trial))
    tuner = tune.Tuner(
        fl_trial,
        param_space={"point": point},
        run_config=tune.RunConfig(name="isolated", storage_path=str(tmp_path / "tune")),
    )
    (result,) = tuner.fit()
    assert result.error is None
    assert result.metrics["accuracy"] == pytest.approx(0.65)
    write_report(sweep_dir, sweep_results(sweep_cfg, run, [point], sweep_dir))
    (row,) = json.loads((sweep_dir / "summary.json").read_text())["rows"]
    assert row["arm"] == point["arm"] == "init=pretrained,alpha=0.1,epochs=5"
    assert row["final_accuracy_mean"] == pytest.approx(0.65)
    assert f"| {point['arm']} | 65.00 |" in (sweep_dir / "report.md").read_text()


# Three tune configs run in --smoke (every one of them: ~7 min). --smoke swaps in tiny offline data per
# modality (sweep.py SMOKE_IMAGE: MNIST, glyphs, ConvNet; SMOKE_AUDIO: FSDD, espeak, audio CNN), 6 clients, 3 per
# round, 2 rounds and one value per grid key, so most smoke sweeps repeat one of these trials:
# - quickstart: images, federated, both inits: run by test_interrupted_sweep_resumes_without_rerunning (the CLI,
#   killed after its first trial and resumed), which checks what the runs below check as well;
# - speech-commands: audio (espeak generation, audio CNN, speakers as clients, eval_every 10 > rounds);
# - synthetic-only: the only other sweep kind (pretraining alone, fl_trial's no-FL branch, the synthetic-only
#   summary). Its smoke inputs are quickstart's (the same synthetic set and pretraining): it builds them for the
#   quickstart and synthetic-public-data sweeps below.
# Every other config's grid points are validated above, their client partitions drawn below, and what their smoke
# runs did beyond a run config's is checked by test_smoke_points_not_run_repeat_a_run_one.
QUICKSTART = REPO / "tune_configs" / "quickstart.yaml"
SMOKE_RUNS = [REPO / "tune_configs" / n for n in ("speech-commands.yaml", "synthetic-only.yaml")]
# The run config each other (arm-less) config's smoke points repeat, and where each field they differ in is covered.
REPEATS = {
    "cifar10.yaml": "quickstart.yaml",
    "cifar100.yaml": "quickstart.yaml",
    "flowers102.yaml": "quickstart.yaml",
    "client-sampling.yaml": "quickstart.yaml",  # its 1 client per round: 3 in --smoke too
    "isolated.yaml": "quickstart.yaml",
    "synthetic-scale.yaml": "quickstart.yaml",
    "zero-shot.yaml": "synthetic-only.yaml",
    "esc50.yaml": "speech-commands.yaml",
}
COVERED = {
    "fl.eval_every": "speech-commands' smoke run evaluates every 10th of its 2 rounds too",
    "fl.target_accuracy": "rounds to target: test_fl_runtime.py, test_metrics_f1.py",
    "partition.alpha": "test_tune_config_grid_points_pass_the_data_checks draws the partition",
    # the smoke prompts' num_per_class wins over scale (test_prompts.py::test_num_per_class_wins_over_scale): the
    # same generation under another key; scale × the real class counts: test_generate_pipeline.py's glyph test
    "prompts.scale": "test_prompts.py, test_generate_pipeline.py",
    "fl.mode": "test_isolated_trial_reports_its_accuracy_to_tune_and_the_report, test_fl_runtime.py",
    "fl.local.epochs": "isolated's local epochs: test_fl_runtime.py::test_isolated_control trains 2",
}
# The baseline sweeps (arms) run test_baselines_flowers102_runs_in_smoke_mode_on_a_tiny_layout (GPT-FL, FedGen,
# DynaFed) and test_synthetic_public_data_arm_runs_in_a_sweep; every other arm's strategy runs on Ray with
# public data in its own test (test_strategy_feddf.py, _dsfl, _fedet; FedProx and SCAFFOLD: test_fl_runtime.py,
# test_fl_secagg.py).


def differing_fields(run_a: dict, run_b: dict) -> set[str]:
    """The dotted fields in which two grid points' run configs differ, bar the run's name."""
    from gptfl_ray.tracking import flatten

    a, b = flatten(run_a), flatten(run_b)
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} - {"name"}


def test_smoke_points_not_run_repeat_a_run_one():
    """Each smoke point of a config not run in --smoke differs from the run config's point of the same init only in
    fields whose code paths other tests cover (COVERED)."""

    def smoke_points(name):
        sweep_cfg, run = load_sweep(REPO / "tune_configs" / name, smoke=True)
        return sweep_cfg.kind, {p["init"]: p["run"] for p in grid_points(sweep_cfg, run)}

    run_names = {p.name for p in [*SMOKE_RUNS, QUICKSTART]}
    assert set(REPEATS) == {p.name for p in TUNE_CONFIGS if not p.name.startswith("baselines-")} - run_names
    for name, ran in REPEATS.items():
        kind, points = smoke_points(name)
        ran_kind, ran_points = smoke_points(ran)
        assert kind == ran_kind and set(points) <= set(ran_points), name
        for init, point_run in points.items():
            differ = differing_fields(point_run, ran_points[init])
            assert differ <= set(COVERED), (name, init, sorted(differ - set(COVERED)))


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


# The data checks `gptfl sweep` makes before starting (validate.check_points_data: each dataset loaded, each
# seed's client partition and public hold-out drawn), for every grid whose data this machine has: every smoke grid
# (baselines-flowers102's on the tiny layout below), and the full grids on MNIST (quickstart, baselines-mnist).
# Not checked, for want of the data: the full grids on CIFAR-10/100, Flowers102, ESC-50 and Speech Commands (their
# files, partitions, public hold-outs and prompts.scale class counts); their configs are checked above.
# The audio smoke grid decodes FSDD (~1 min, cached for the session): slow, and after the speech-commands run.
@pytest.mark.slow
@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.name)
def test_tune_config_grid_points_pass_the_data_checks(path, data_dir, tmp_path):
    from gptfl_ray.validate import check_points_data

    overrides = []
    if path.name == "baselines-flowers102.yaml":
        write_tiny_flowers102(tmp_path)
        overrides = [f"data_dir={tmp_path}"]
    for smoke in (True, False):
        sweep_cfg, run = load_sweep(path, overrides if smoke else [], smoke=smoke)
        points = grid_points(sweep_cfg, run)
        datasets = {p["run"]["data"]["dataset"] for p in points}
        here = all((Path(run.data_dir or data_dir) / d).is_dir() for d in datasets)
        assert here or not smoke, f"smoke data {datasets} not found"
        if here:
            check_points_data(points)


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
    """GPT-FL, FedGen and DynaFed on Flowers102-shaped data (102 classes, RGB, resized to 32×32), 2 rounds each:
    the ConvNet arms. FedAvg's ConvNet arm is FedGen's point with FedGen's strategy swapped for FedAvg (checked
    here), whose code FedGen runs too, so it is not rerun. The VGG19 arms take ~8 more minutes on 2 cores (DynaFed
    unrolls VGG19: 6.5 min alone), so the suite leaves them to `gptfl sweep tune_configs/baselines-flowers102.yaml
    --smoke`."""
    from gptfl_ray.sweep import sweep

    data_dir = tmp_path / "data"
    write_tiny_flowers102(data_dir)
    sweep_cfg, run = load_sweep(
        REPO / "tune_configs" / "baselines-flowers102.yaml", [f"data_dir={data_dir}"], smoke=True
    )
    convnet = {a.name: a for a in sweep_cfg.arms if a.name.endswith("-convnet")}
    assert len(convnet) == 4 and len(sweep_cfg.arms) == 8
    (fedavg_point,), (fedgen_point,) = (
        grid_points(sweep_cfg.model_copy(update={"arms": [convnet[n]]}), run)
        for n in ("fedavg-convnet", "fedgen-convnet")
    )
    assert fedavg_point["init"] == fedgen_point["init"] == "random"
    differ = differing_fields(fedavg_point["run"], fedgen_point["run"])
    assert differ and all(k.startswith("fl.strategy") for k in differ), differ
    del convnet["fedavg-convnet"]
    sweep_cfg = sweep_cfg.model_copy(update={"arms": list(convnet.values())})
    out = sweep(sweep_cfg, run, tmp_path / "sweep", shared_dir=tmp_path / "shared")
    assert out["errors"] == []
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert {r["arm"] for r in summary["rows"]} == {f"{m}-convnet" for m in ("gptfl", "fedgen", "dynafed")}
    assert all(0 <= r["final_accuracy_mean"] <= 1 for r in summary["rows"])


@pytest.mark.slow
def test_synthetic_public_data_arm_runs_in_a_sweep(tmp_path, ray_session, data_dir, tmp_path_factory):
    """baselines-mnist's FedDF arm with the synthetic set as its public data (public_data.source: synthetic): the
    sweep hands the trial the very synthetic set the GPT-FL arm pretrains on, and the trial runs on it. Its other
    arms differ only in the strategy, which runs with public data in its own test (see REPEATS above)."""
    from gptfl_ray.run import synthetic_key
    from gptfl_ray.sweep import sweep

    shared = tmp_path_factory.getbasetemp() / "sweep-shared"  # the smoke runs' synthetic set: reused
    sweep_cfg, run = load_sweep(REPO / "tune_configs" / "baselines-mnist.yaml", smoke=True)
    arms = {a.name: a for a in sweep_cfg.arms}
    gptfl = sweep_cfg.model_copy(update={"arms": [arms["gptfl"]]})
    sweep_cfg = sweep_cfg.model_copy(update={"arms": [arms["feddf-synthetic"]]})
    out = sweep(sweep_cfg, run, tmp_path / "sweep", shared_dir=shared)
    assert out["errors"] == []
    (point,) = json.loads((tmp_path / "sweep" / "points.json").read_text())
    assert point["run"]["public_data"]["source"] == "synthetic" and point["init"] == "random"
    (gptfl_point,) = grid_points(gptfl, run)
    # the synthetic set the GPT-FL arm pretrains on (its labels: the dataset's, None)
    pretrained_on = synthetic_key(RunConfig.model_validate(gptfl_point["run"]), None)
    assert Path(point["synthetic_dir"]) == shared / f"synthetic-{pretrained_on}"
    (row,) = json.loads((tmp_path / "sweep" / "summary.json").read_text())["rows"]
    assert row["arm"] == "feddf-synthetic" and 0 <= row["final_accuracy_mean"] <= 1
    assert json.loads((Path(point["trial_dir"]) / "summary.json").read_text())["strategy"] == "feddf"


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning(tmp_path, data_dir, tmp_path_factory, ray_session):
    """quickstart.yaml's smoke sweep through the CLI: `gptfl sweep` (a driver of its own on the session's Ray
    instance, as a job on a cluster) is SIGKILLed once its first trial has finished; `--resume` runs only the
    second and reports both."""
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "GPTFL_DATA_DIR": str(data_dir)}
    base = [
        sys.executable,
        "-m",
        "gptfl_ray.cli",
        "sweep",
        str(QUICKSTART),
        "--smoke",
        "--output",
        str(sweep_dir),
        "--shared",  # synthetic-only's smoke run above already built the synthetic data and weights
        str(tmp_path_factory.getbasetemp() / "sweep-shared"),
        "--set",
        f"ray_address={ray_session.get_runtime_context().gcs_address}",
    ]  # 2 trials of 2 rounds, one after the other: the second is still to run when the first has finished
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
    wait_for_released_cpus()  # the second trial's actor is gone
    (finished,) = list((sweep_dir / "trials").glob("*/summary.json"))
    mtime = finished.stat().st_mtime_ns
    done = subprocess.run([*base, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert finished.stat().st_mtime_ns == mtime  # the finished trial was not rerun
    assert len(list((sweep_dir / "trials").glob("*/summary.json"))) == 2
    rows = json.loads((sweep_dir / "summary.json").read_text())["rows"]
    sweep_cfg, run = load_sweep(QUICKSTART, smoke=True)
    assert len(rows) == len(grid_points(sweep_cfg, run)) == 2  # both inits
    assert all(0 <= r["final_accuracy_mean"] <= 1 for r in rows)
    assert (sweep_dir / "report.md").is_file() and "failed trial" not in done.stdout
