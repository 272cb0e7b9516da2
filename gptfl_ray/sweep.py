"""``gptfl sweep``: Ray Tune over GPT-FL's FL step (algorithms × init × seeds × α × …) for one sweep YAML.

A sweep file names a base run config and a grid of dotted config paths (plus ``init`` and ``seed``)::

    name: quickstart
    base: ../configs/mnist-glyphs-quick.yaml      # relative to this file
    set: {fl.rounds: 20}                           # overrides of the base
    grid:
      fl.strategy: [{name: fedavg}, {name: fedprox, mu: 0.01}]
      init: [pretrained, random]
      seed: [0, 1]

Without ``seed`` in the grid every seed of the run config's ``seeds`` is run. ``arms`` names comparison arms
that differ in more than one field (an algorithm with its own public data, model or init); each arm is crossed
with the grid, and may run fewer seeds::

    arms:
      - {name: gptfl, init: pretrained}
      - {name: feddf, set: {fl.strategy: {name: feddf}, public_data.source: holdout}}
      - {name: feddf-synthetic, set: {...}, seeds: [0]}
 A ``kind: synthetic_only`` sweep
(no FL) takes no ``init`` or ``fl.*`` grid keys; its report has one synthetic-only row per grid point.

The driver first builds the shared inputs once per distinct config — synthetic data, and pretrained weights per
seed — in ``<sweep>/shared``; then every grid point becomes a Tune trial running the FL job in its own actor
placement group, reporting every round to Tune. ``--resume`` restores the Tuner and never reruns finished trials;
an unfinished FL trial continues from its own checkpoint. The sweep ends with the same table and plots as a run.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from gptfl_ray.config import (
    MAX_SEED,
    ConfigError,
    FolderName,
    RunConfig,
    Section,
    Seed,
    apply_overrides,
    config_hash,
    echo,
    read_yaml,
    validate_config,
)
from gptfl_ray.console import verbose
from gptfl_ray.data.base import get_spec
from gptfl_ray.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

SPECIAL_KEYS = ("init", "seed")


class SweepArm(Section):
    """One comparison arm: its own dotted overrides and init, crossed with the grid."""

    name: FolderName
    set: dict[str, Any] = Field(default_factory=dict)
    init: Literal["random", "pretrained"] = "random"
    seeds: list[Seed] | None = Field(None, min_length=1)  # default: the grid's (or run config's) seeds
    smoke: dict[str, Any] = Field(default_factory=dict)  # extra dotted overrides for --smoke, after `set`


class SweepConfig(Section):
    name: FolderName  # the sweep's folder and Tune experiment name
    base: Path  # run config, relative to the sweep file
    set: dict[str, Any] = Field(default_factory=dict)  # dotted overrides of the base
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    arms: list[SweepArm] = Field(default_factory=list)
    # "federated": FL trials; "synthetic_only": the pretrained model on the real test set (no FL).
    kind: Literal["federated", "synthetic_only"] = "federated"
    smoke: dict[str, Any] = Field(default_factory=dict)  # extra dotted overrides for --smoke
    max_concurrent_trials: int | None = Field(None, gt=0)
    max_failures: int = Field(2, ge=0)
    description: str = ""


# Tiny substitutes that make any sweep run in seconds on the offline datasets (`--smoke`). Whole sections
# (prompts, generate, pretrain) are replaced, so every smoke sweep of a modality shares one synthetic dataset and
# one pretraining (built once in the shared folder); the grid and the FL settings stay the config's own.
SMOKE_IMAGE = {
    "data": {"dataset": "mnist", "test_split": "holdout", "num_test": 300, "num_train": 600},
    "generate": {"generator": "glyphs", "batch_size": 40, "rows_per_shard": 80},
    "model": {"name": "convnet", "width": 8},
    "partition.method": "dirichlet",
}
SMOKE_AUDIO = {
    "data": {"dataset": "fsdd", "test_split": "official", "num_test": 200, "num_train": 600},
    "generate": {"generator": "espeak", "batch_size": 40, "rows_per_shard": 80},
    "model": {"name": "audio_cnn"},
    "partition.method": "natural",
    "partition.sub_splits": 1,
}
SMOKE_TEXT = {
    "data": {"dataset": "meld", "test_split": "official", "num_test": 300, "num_train": 600},
    "generate": {"generator": "text-grammar", "batch_size": 56, "rows_per_shard": 56},
    "model": {"name": "text_cnn"},
    "partition.method": "dirichlet",
}
SMOKE = {"image": SMOKE_IMAGE, "audio": SMOKE_AUDIO, "text": SMOKE_TEXT}
SMOKE_COMMON = {
    "partition.num_clients": 6,
    "partition.min_size": 1,
    "prompts": {"num_per_class": 8},
    "pretrain": {"epochs": 1, "batch_size": 32},
    "fl.rounds": 2,
    "fl.clients_per_round": 3,
    "fl.num_actors": 1,
    "fl.actor_num_gpus": 0,
    "fl.isolated_clients": 2,
    "fl.checkpoint_every": 1,
    "seeds": [0],
}


# ------------------------------------------------------------------------------------------ loading
def load_sweep(
    path: str | Path, overrides: list[str] | None = None, smoke: bool = False
) -> tuple[SweepConfig, RunConfig]:
    """Validate a sweep file and its base run config (with `set`, smoke substitutes and --set applied)."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        raise ConfigError(f"{path}: {'.'.join(map(str, e['loc']))}: {e['msg']}") from None
    base_path = (path.parent / sweep.base).resolve()
    base = read_yaml(base_path)
    dotted = dict(sweep.set)
    if smoke:
        probe = validate_config(apply_overrides(base, [_kv(k, v) for k, v in dotted.items()]), str(base_path))
        modality = get_spec(probe.data, probe.data_dir).modality
        dotted.update({**SMOKE.get(modality, SMOKE_AUDIO), **SMOKE_COMMON, **sweep.smoke})
    raw_run = apply_overrides(base, [_kv(k, v) for k, v in dotted.items()] + list(overrides or []))
    run = validate_config(raw_run, f"{path} (base {sweep.base})")
    for key, values in sweep.grid.items():
        if not values:
            raise ConfigError(f"{path}: grid.{key}: empty list")
        if sweep.kind == "synthetic_only" and (key == "init" or key.startswith("fl.")):
            raise ConfigError(
                f"{path}: grid.{key}: a synthetic_only sweep runs no FL (its init is pretrained)"
            )
    names = [a.name for a in sweep.arms]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"{path}: arms: duplicate arm name {sorted(n for n in names if names.count(n) > 1)[0]!r}"
        )
    if sweep.arms and "init" in sweep.grid:
        raise ConfigError(f"{path}: grid.init: the arms set each arm's init")
    if smoke:  # the smoke grid's values only: the full grid may not fit the smoke substitutes (model.width)
        arms = [
            a.model_copy(update={"seeds": a.seeds[:1] if a.seeds else None, "set": {**a.set, **a.smoke}})
            for a in sweep.arms
        ]
        sweep = sweep.model_copy(update={"grid": _smoke_grid(sweep.grid), "arms": arms})
    for arm in sweep.arms:  # every arm must make a valid config
        validate_config(
            apply_overrides(raw_run, [_kv(k, v) for k, v in arm.set.items()]), f"{path}: arms[{arm.name}].set"
        )
    for key, values in sweep.grid.items():
        if key in SPECIAL_KEYS:
            continue
        for v in values:  # every grid value must make a valid config
            validate_config(apply_overrides(raw_run, [_kv(key, v)]), f"{path}: grid.{key}={v!r}")
    return sweep, run


def _kv(key: str, value: Any) -> str:
    import json

    return f"{key}={json.dumps(value)}"


def _smoke_grid(grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """One value per key (both values of `init`, one seed): every code path, fewest trials."""
    return {k: (v if k == "init" else v[:1]) for k, v in grid.items()}


def grid_points(sweep: SweepConfig, run: RunConfig) -> list[dict[str, Any]]:
    """Every grid point as {"arm", "seed", "init", "run" (validated config JSON)}."""
    from gptfl_ray.validate import validate_run

    grid = dict(sweep.grid)
    seeds = grid.pop("seed", list(run.seeds))  # no `seed` in the grid: every seed of the run config
    keys = list(grid)
    combos = [
        (arm, dict(zip(keys, combo, strict=True)), seed)
        for arm in (list(sweep.arms) or [None])
        for combo in itertools.product(*(grid[k] for k in keys))
        for seed in (arm.seeds if arm is not None and arm.seeds else seeds)  # an arm may run fewer seeds
    ]
    points = []
    for arm, values, seed in combos:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"grid.seed: must be an integer in 0..{MAX_SEED} (got {echo(seed)})")
        init = values.pop("init", "pretrained" if sweep.kind == "synthetic_only" else "random")
        if arm is not None:
            init = arm.init
        if init not in ("random", "pretrained"):
            raise ConfigError(f"grid.init: must be 'random' or 'pretrained' (got {init!r})")
        overrides = [_kv(k, v) for k, v in (arm.set if arm else {}).items()]
        raw = apply_overrides(run.model_dump(mode="json"), overrides + [_kv(k, v) for k, v in values.items()])
        cfg = validate_config(raw, f"grid point {values}" + (f" of arm {arm.name}" if arm else ""))
        # Everything this point's steps will check (strategy, generator, model, ...), before anything starts.
        steps = (["federate"] if sweep.kind == "federated" else []) + (
            ["labels", "generate", "pretrain"] if init == "pretrained" else []
        )
        if sweep.kind == "federated" and cfg.public_data.source == "synthetic":
            steps += ["labels", "generate"]  # the synthetic data is the public set
        try:  # points sharing a section share its check (validate_run remembers what passed)
            validate_run(cfg, steps=steps, baselines=False)
        except ConfigError as err:
            where = f"arm {arm.name}, " if arm else ""
            raise ConfigError(f"grid point {where}{echo(values, 200)}: {err}") from None
        head = [arm.name] if arm else [f"init={init}"]
        label = ",".join(head + [f"{_short(k)}={_label(v)}" for k, v in values.items()])
        points.append({"arm": label, "seed": seed, "init": init, "run": cfg.model_dump(mode="json")})
    seen: set[tuple[str, int]] = set()
    for p in points:  # results, reports and trial folders are keyed by (arm, seed)
        if (p["arm"], p["seed"]) in seen:
            raise ConfigError(
                f"grid: two grid points are both {p['arm']} seed {p['seed']} (a repeated value?)"
            )
        seen.add((p["arm"], p["seed"]))
    return points


def _short(key: str) -> str:
    return key.split(".")[-1]


def _label(v: Any) -> str:
    if isinstance(v, dict):
        rest = ",".join(f"{k}={x}" for k, x in v.items() if k != "name")
        return f"{v.get('name', '?')}" + (f"({rest})" if rest else "")
    return str(v)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)[:80]


# ------------------------------------------------------------------------------------------ shared inputs
def build_shared(points: list[dict[str, Any]], shared: Path) -> None:
    """Synthetic data per distinct generation config and pretrained weights per (config, seed) — once each."""
    from gptfl_ray.pretrain import pretrain_key, real_test_tensors
    from gptfl_ray.run import step_generate, step_labels, step_pretrain, synthetic_key

    synthetic_dirs: dict[str, Path] = {}
    pretrained: dict[str, tuple[Path, dict]] = {}
    tests: dict[str, Any] = {}
    for p in points:
        cfg = RunConfig.model_validate(p["run"])
        public = cfg.public_data.source == "synthetic" and p.get("kind", "federated") == "federated"
        if p["init"] != "pretrained" and not public:
            continue
        dkey = config_hash(cfg.data)
        if dkey not in tests:  # real data first: fail before any generation if it is missing
            tests[dkey] = real_test_tensors(cfg, required=True)
        labels = step_labels(cfg, shared)
        gkey = synthetic_key(cfg, labels)
        if gkey not in synthetic_dirs:
            synthetic_dirs[gkey] = step_generate(cfg, shared, labels)
        if public:  # the run's own synthetic data as the public set (public_data.source: synthetic)
            p["synthetic_dir"] = str(synthetic_dirs[gkey])
        if p["init"] != "pretrained":
            continue
        pkey = pretrain_key(cfg, synthetic_dirs[gkey].name, p["seed"])
        if pkey not in pretrained:
            pretrained[pkey] = step_pretrain(cfg, shared, synthetic_dirs[gkey], p["seed"], tests[dkey])
        weights, metrics = pretrained[pkey]
        p["init_weights"] = str(weights)
        p["synthetic_only"] = metrics.get("real_test_accuracy")
        p["synthetic_only_f1"] = {m: metrics.get(f"real_test_{m}") for m in ("weighted_f1", "macro_f1")}


# ------------------------------------------------------------------------------------------ trainable
def _scalar_metrics(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if isinstance(v, int | float | bool | str) or v is None}


def fl_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one FL job; every evaluated round is reported to Tune."""
    from ray import tune

    point = config["point"]
    out = Path(point["trial_dir"])
    if point.get("kind") == "synthetic_only":
        f1 = dict(point.get("synthetic_only_f1") or {})
        tune.report({"accuracy": point.get("synthetic_only"), **f1, "round": 0, "done": True})
        return
    from gptfl_ray.fl.runner import run_federated

    cfg = RunConfig.model_validate(point["run"])
    if (out / "summary.json").is_file():
        summary = read_json(out / "summary.json")
    else:
        import torch

        # The server half (aggregation, FedDF/Fed-ET distillation, DynaFed's matching) runs in this trainable
        # while the trial's client actors wait; Ray gave the 0-CPU head bundle one torch thread: use the CPUs
        # the trial holds.
        torch.set_num_threads(max(1, int(cfg.fl.num_actors * cfg.fl.actor_num_cpus)))
        summary = run_federated(
            cfg,
            seed=point["seed"],
            out_dir=out,
            init_weights=point.get("init_weights"),
            resume=(out / "checkpoint").is_dir(),
            synthetic_dir=point.get("synthetic_dir"),
            on_round=lambda m: tune.report(_scalar_metrics({k: v for k, v in m.items() if k != "sampled"})),
            on_round_overlaps=True,  # reporting to Tune need not hold the next round back
        )
    tune.report(final_report(summary))


def final_report(summary: dict[str, Any]) -> dict[str, Any]:
    """A finished trial's last Tune report: its scalar summary and the run's headline ``accuracy``."""
    from gptfl_ray.report import run_accuracy

    return {**_scalar_metrics(summary), "accuracy": run_accuracy(summary), "done": True}


def trial_resources(cfg: RunConfig):
    """The trial's placement group: an empty head bundle (the trainable waits) + one bundle per client actor."""
    from ray import tune

    actor = {
        "CPU": cfg.fl.actor_num_cpus,
        **({"GPU": cfg.fl.actor_num_gpus} if cfg.fl.actor_num_gpus else {}),
    }
    return tune.PlacementGroupFactory([{}] + [dict(actor) for _ in range(cfg.fl.num_actors)], strategy="PACK")


# ------------------------------------------------------------------------------------------ driver
def flat_params(sweep_cfg: SweepConfig, point: dict[str, Any]) -> dict[str, Any]:
    """A grid point's readable params: arm, seed, init and the value of every swept (dotted) config key."""
    keys = [k for k in sweep_cfg.grid if k not in ("seed", "init")]
    keys += [k for arm in sweep_cfg.arms for k in arm.set if k not in keys]
    out: dict[str, Any] = {"arm": point["arm"], "seed": point["seed"], "init": point["init"]}
    for key in keys:
        node: Any = point["run"]
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node if node is None or isinstance(node, bool | int | float | str) else json.dumps(node)
    return out


def _trial_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The trial config a ``sample_from`` function is given: Tune hands over the config or the experiment spec
    holding it (``config``), depending on its version."""
    return spec["config"] if "config" in spec and "point" not in spec else spec


def flat_param_space(sweep_cfg: SweepConfig, points: list[dict[str, Any]]) -> dict[str, Any]:
    """Tune ``sample_from`` entries copying each trial's flat params out of its grid point."""
    from ray import tune

    for p in points:
        p["params"] = flat_params(sweep_cfg, p)
    if not points:
        return {}
    return {
        key: tune.sample_from(lambda spec, key=key: _trial_config(spec)["point"]["params"].get(key))
        for key in points[0]["params"]
    }


def sweep(
    sweep_cfg: SweepConfig,
    run: RunConfig,
    sweep_dir: Path,
    resume: bool = False,
    shared_dir: Path | None = None,
) -> dict[str, Any]:
    """Build shared inputs (in ``shared_dir``, default ``<sweep_dir>/shared``), run the Tune grid, write the report."""
    from ray import tune

    from gptfl_ray.report import write_report
    from gptfl_ray.tracking import tracking_callbacks

    started = time.perf_counter()
    sweep_dir = Path(sweep_dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    points = grid_points(sweep_cfg, run)
    for p in points:
        p["kind"] = sweep_cfg.kind
    build_shared(points, Path(shared_dir) if shared_dir else sweep_dir / "shared")
    for p in points:
        # `tracking` says where results are logged, not what they are: trial folders keep their key without it
        run_key = {k: v for k, v in p["run"].items() if k != "tracking"}
        key = config_hash(run_key, p["init"], p.get("init_weights"), p["seed"], length=8)
        if p.get("synthetic_dir"):  # older trial folders (no public data) keep their key
            key = config_hash(key, Path(p["synthetic_dir"]).name, length=8)
        p["trial_dir"] = str(sweep_dir / "trials" / f"{_slug(p['arm'])}-seed{p['seed']}-{key}")
    atomic_write_json(sweep_dir / "points.json", points)

    storage = str(sweep_dir / "tune")
    trainable = tune.with_resources(fl_trial, trial_resources(run))
    # built (and the local MLflow file store allowed) in every invocation: a restored experiment brings its own
    # pickled callbacks, which need the same environment to set up
    callbacks = tracking_callbacks(run, sweep_dir, sweep_cfg.name)
    if resume and tune.Tuner.can_restore(f"{storage}/{sweep_cfg.name}"):
        log.info("restoring the Tune experiment in %s", storage)
        tuner = tune.Tuner.restore(f"{storage}/{sweep_cfg.name}", trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            # `point` drives the trial; the flat keys beside it (arm, seed, init, the grid's dotted keys) are
            # what the MLflow UI and TensorBoard's HParams view show
            param_space={"point": tune.grid_search(points), **flat_param_space(sweep_cfg, points)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=sweep_cfg.max_concurrent_trials,
                trial_name_creator=lambda t: _slug(t.config["point"]["arm"])[:60],
                trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=sweep_cfg.name,
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=sweep_cfg.max_failures),
                callbacks=callbacks,
                verbose=None if verbose() else 1,  # quiet: Tune's status table only, not every result
            ),
        )
    grid = tuner.fit()
    errors = [str(r.error).splitlines()[0] for r in grid if r.error]
    results = {
        **sweep_results(sweep_cfg, run, points, sweep_dir),
        "errors": errors,
        "wall_time_s": time.perf_counter() - started,  # this invocation's (a --resume counts its own part)
    }
    report = write_report(sweep_dir, results)
    return {"results": results, "report": report, "errors": errors}


def sweep_results(
    sweep_cfg: SweepConfig, run: RunConfig, points: list[dict[str, Any]], sweep_dir: Path
) -> dict[str, Any]:
    """The report's index: finished FL trials and synthetic-only accuracies, each by grid point (arm) and seed."""
    results: dict[str, Any] = {
        "name": sweep_cfg.name,
        "seeds": sorted({p["seed"] for p in points}),
        "arms": {},
        "synthetic_only": {},  # {arm: {seed: {"real_test_accuracy": ...}}}: one pretraining per grid point
        "target_accuracy": run.fl.target_accuracy,
        "target_metric": run.fl.target_metric,
    }
    for p in points:
        if p.get("synthetic_only") is not None:
            results["synthetic_only"].setdefault(p["arm"], {})[str(p["seed"])] = {
                "real_test_accuracy": p["synthetic_only"],
                **{f"real_test_{m}": v for m, v in (p.get("synthetic_only_f1") or {}).items()},
            }
        if sweep_cfg.kind == "federated" and (Path(p["trial_dir"]) / "summary.json").is_file():
            results["arms"].setdefault(p["arm"], {})[str(p["seed"])] = {
                "dir": str(Path(p["trial_dir"]).relative_to(sweep_dir))
            }
    return results


def default_sweep_dir(sweep_cfg: SweepConfig, run: RunConfig, smoke: bool) -> Path:
    return run.output_dir / "sweeps" / (sweep_cfg.name + ("-smoke" if smoke else ""))


def sweep_command(args) -> int:
    from gptfl_ray.ray_env import ray_for
    from gptfl_ray.report import print_summary_table

    sweep_cfg, run = load_sweep(args.config, args.overrides, smoke=args.smoke)
    sweep_dir = Path(args.output) if args.output else default_sweep_dir(sweep_cfg, run, args.smoke)
    with ray_for(run.ray_address, announce=True):
        print(f"sweep folder: {sweep_dir}", flush=True)
        out = sweep(sweep_cfg, run, sweep_dir, resume=args.resume, shared_dir=args.shared)
    print_summary_table(out["results"], sweep_dir)
    for e in out["errors"]:
        print(f"failed trial: {e}")
    print(f"report: {out['report']}")
    return 1 if out["errors"] else 0


__all__ = ["SweepConfig", "fl_trial", "grid_points", "load_sweep", "sweep", "sweep_command"]
