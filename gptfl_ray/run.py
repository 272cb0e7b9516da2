"""``gptfl run``: GPT-FL end to end for one config, with its baselines, in one run folder.

    labels ─► prompts + generate ─► pretrain (per seed) ─► FL from the pretrained weights (GPT-FL)
                                                        └► each `baselines:` arm (FL from random init, …)
                                                        └► report.md, plots, summary table

Every step writes its output into the run folder under a name carrying its config hash, and is skipped when
that output is complete; ``--resume RUN_DIR`` reruns the same config and continues whatever was unfinished
(FL arms resume from their last checkpoint, pretraining from its last epoch). The CONFIG given with ``--resume``
(its ``--set`` options included) must be the run's own: one that differs from ``RUN_DIR/config.yaml`` in any
field but ``NON_RESULT_FIELDS`` is refused, naming the fields. Before Ray starts, the CLI validates every step and
arm (``gptfl_ray.validate``) and ``run_command`` loads the data and draws every seed's partition.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gptfl_ray.config import (
    BaselineConfig,
    ConfigError,
    RunConfig,
    config_hash,
    dump_config,
    format_validation_error,
    load_config,
    save_config,
)
from gptfl_ray.errors import InputNotFoundError
from gptfl_ray.io import read_json

log = logging.getLogger(__name__)

GPTFL_ARM = "gptfl"
# With `model.weights`: FL starting from those weights directly (no synthetic pretraining), the paper's question
# of what GPT-FL adds to an existing pretrained model.
PRETRAINED_INIT_ARM = "pretrained-init"
# The only fields in which the CONFIG of a resumed run may differ from the run folder's config.yaml: where things
# are and which cluster runs them. Every other field either changes what a step computes or is part of a step's
# output key (the generate/pretrain/fl sections are hashed whole, resources included: a changed
# fl.num_actors would silently start that arm afresh in a new folder), or names the results (name).
NON_RESULT_FIELDS = ("output_dir", "data_dir", "ray_address", "tracking")


# ------------------------------------------------------------------------------------------ arms
def arm_config(cfg: RunConfig, baseline: BaselineConfig | None) -> RunConfig:
    """The run config of one arm: the main config with the baseline's `fl` overrides applied."""
    if baseline is None:
        return cfg
    merged = _deep_merge(cfg.fl.model_dump(mode="json"), baseline.fl)
    try:
        return cfg.model_copy(update={"fl": type(cfg.fl).model_validate(merged)})
    except ValidationError as err:  # -> one line naming the arm and the field
        raise ConfigError(format_validation_error(err, f"baselines[{baseline.name}].fl")) from None


def arms(cfg: RunConfig) -> list[tuple[str, RunConfig, bool]]:
    """(arm name, arm config, starts from pretrained weights) for GPT-FL, "pretrained-init" (when
    ``model.weights`` is set: FL from those weights) and each baseline."""
    out = [(GPTFL_ARM, cfg, True)]
    names = {GPTFL_ARM}
    if cfg.model.weights is not None:
        out.append((PRETRAINED_INIT_ARM, cfg, True))
        names.add(PRETRAINED_INIT_ARM)
    for b in cfg.baselines:
        if b.name in names:
            raise ConfigError(f"baselines: duplicate arm name {b.name!r}")
        names.add(b.name)
        out.append((b.name, arm_config(cfg, b), b.init == "pretrained"))
    return out


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ------------------------------------------------------------------------------------------ steps
def synthetic_key(cfg: RunConfig, label_names: list[str] | None) -> str:
    """The generation config (as the pipeline hashes it) plus the label list it is given."""
    from gptfl_ray.generate.pipeline import synthetic_hash

    return config_hash(synthetic_hash(cfg), label_names)


def step_labels(cfg: RunConfig, run_dir: Path) -> list[str] | None:
    """Label names for the prompts: from the config, the dataset (None), or collected privately."""
    if cfg.labels.source == "config":
        if not cfg.labels.names:
            raise ConfigError("labels.names: required when labels.source is 'config'")
        return list(cfg.labels.names)
    if cfg.labels.source == "dataset":
        return None
    from gptfl_ray.labels.collect import collect_labels

    path = run_dir / f"labels-{config_hash(cfg.data, cfg.partition, cfg.labels, cfg.seeds[0])}.json"
    if path.is_file():
        log.info("labels: cached %s", path.name)
        return read_json(path)["labels"]
    log.info("labels: collecting the label union with IBLT + secure aggregation")
    return collect_labels(cfg, cfg.seeds[0], cfg.data_dir, output=path)["labels"]


def step_generate(cfg: RunConfig, run_dir: Path, label_names: list[str] | None) -> Path:
    from gptfl_ray.generate.pipeline import generate

    out = run_dir / f"synthetic-{synthetic_key(cfg, label_names)}"
    if (out / "manifest.json").is_file() and read_json(out / "manifest.json").get("complete"):
        log.info("generate: cached %s", out.name)
        return out
    log.info("generate: %s -> %s", cfg.generate.generator, out.name)
    generate(cfg, out, label_names=label_names, data_dir=cfg.data_dir)
    return out


def step_pretrain(cfg: RunConfig, run_dir: Path, synthetic: Path, seed: int, test) -> tuple[Path, dict]:
    from gptfl_ray.pretrain import pretrain, pretrain_key

    out = run_dir / f"pretrain-{pretrain_key(cfg, synthetic.name, seed)}-seed{seed}"
    metrics = pretrain(cfg, synthetic, out, seed=seed, test=test)
    return out / "weights.safetensors", metrics


def step_init_weights(cfg: RunConfig, run_dir: Path, seed: int, data) -> Path:
    """The pretrained-init arm's starting state: the seed's fresh model with ``model.weights`` loaded into it
    (a head of another shape keeps the seed's fresh initialisation, as FL's own random init would draw it)."""
    import torch

    from gptfl_ray.io import save_weights
    from gptfl_ray.models import build_model
    from gptfl_ray.models.weights import load_model_weights, weights_identity

    key = config_hash(cfg.model, weights_identity(cfg.model.weights), data.num_classes, data.input_shape)
    out = run_dir / f"init-{key}-seed{seed}.safetensors"
    if not out.is_file():
        torch.manual_seed(seed)  # as run_federated seeds its model
        model = build_model(cfg.model.name, data.num_classes, data.input_shape, width=cfg.model.width)
        load_model_weights(model, cfg.model.weights)
        save_weights(out, model.state_dict(), metadata={"model": cfg.model.name})
    return out


def step_federate(arm_cfg: RunConfig, out: Path, seed: int, init: Path | None, data, idle) -> dict:
    from gptfl_ray.fl.runner import run_federated

    if (out / "summary.json").is_file():
        log.info("federate: cached %s", out.name)
        return read_json(out / "summary.json")
    resume = (out / "checkpoint").is_dir()
    log.info("federate: %s%s", out.name, " (resuming)" if resume else "")
    return run_federated(
        arm_cfg, seed=seed, out_dir=out, init_weights=init, resume=resume, data=data, idle=idle
    )


def fl_dir(
    run_dir: Path, arm: str, arm_cfg: RunConfig, seed: int, init_key: str, public_key: str | None = None
) -> Path:
    """An arm's FL folder, keyed by everything the FL step reads (``public_key``: the synthetic public data)."""
    parts = [arm_cfg.data, arm_cfg.partition, arm_cfg.model, arm_cfg.fl, init_key, seed]
    if arm_cfg.public_data.source != "none":  # older folders (no public data) keep their key
        parts += [arm_cfg.public_data, public_key]
    return run_dir / "fl" / f"{arm}-seed{seed}-{config_hash(*parts)}"


# ------------------------------------------------------------------------------------------ driver
def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the fields in which two dumped configs differ (lists compare whole)."""
    out = []
    for key in [*old, *(k for k in new if k not in old)]:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif key not in old or key not in new or a != b:
            out.append(f"{prefix}{key}")
    return out


def check_resume(cfg: RunConfig, run_dir: Path, source: str = "the config") -> bool:
    """Whether ``run_dir`` already holds a run (its ``config.yaml``); if so, ``cfg`` (the CONFIG file with its
    --set overrides, named ``source``) must equal that config in every field but ``NON_RESULT_FIELDS``."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return False
    old, new = dump_config(load_config(saved)), dump_config(cfg)
    changed = [f for f in config_differences(old, new) if f.split(".")[0] not in NON_RESULT_FIELDS]
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise ConfigError(
            f"{source}: differs from {saved} in {shown}; a run keeps the config it started with (only "
            f"{', '.join(NON_RESULT_FIELDS)} may change): resume with the same config and --set options, "
            "or start a new run folder"
        )
    return True


def run(cfg: RunConfig, run_dir: Path, test: Any = None) -> dict[str, Any]:
    """Run every step for every seed into ``run_dir``; return the results index the report reads.

    ``run_dir`` may hold an earlier run of the same config (see ``check_resume``): finished steps are reused.
    ``test``: the real test set as model tensors, when the caller has loaded it already.
    """
    from gptfl_ray.fl.pool import IdleActors
    from gptfl_ray.fl.runner import prepare_federated_data
    from gptfl_ray.pretrain import real_test_tensors
    from gptfl_ray.report import run_accuracy, write_report
    from gptfl_ray.tracking import Tracker

    resumed = check_resume(cfg, run_dir)  # an earlier invocation's work is in here
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    t0 = time.perf_counter()
    if test is None:
        test = real_test_tensors(cfg, required=True)  # the real data must exist before hours of generation
    tracker = Tracker(cfg, run_dir)  # MLflow: never fatal (gptfl_ray/tracking.py)
    tracker.start()
    label_names = step_labels(cfg, run_dir)
    synthetic = step_generate(cfg, run_dir, label_names)
    results: dict[str, Any] = {
        "name": cfg.name,
        "seeds": cfg.seeds,
        "arms": {},
        "synthetic_only": {},
        "target_accuracy": cfg.fl.target_accuracy,
        "target_metric": cfg.fl.target_metric,
        "synthetic_dir": synthetic.name,
    }
    for seed in cfg.seeds:
        weights, pre = step_pretrain(cfg, run_dir, synthetic, seed, test)
        tracker.log_pretrain(seed, weights.parent, pre)
        results["synthetic_only"][str(seed)] = {
            "real_test_accuracy": pre.get("real_test_accuracy"),
            "real_test_weighted_f1": pre.get("real_test_weighted_f1"),
            "real_test_macro_f1": pre.get("real_test_macro_f1"),
            "val_accuracy": pre.get("final_val_accuracy"),
            "pretrain_dir": weights.parent.name,
        }
        data = prepare_federated_data(cfg, seed, cfg.data_dir, synthetic)
        public_key = synthetic.name if cfg.public_data.source == "synthetic" else None
        # The seed's arms run one after another on the same client actors (started once, reconfigured per arm);
        # they are stopped before the next seed's pretraining needs the CPUs.
        with IdleActors() as idle:
            for arm, arm_cfg, from_pretrained in arms(cfg):
                init = weights if from_pretrained else None
                if arm == PRETRAINED_INIT_ARM:
                    init = step_init_weights(cfg, run_dir, seed, data)
                out = fl_dir(run_dir, arm, arm_cfg, seed, _init_key(init, weights), public_key)
                tracker.start_arm(arm, arm_cfg, seed, out)  # a resumed arm logs into the same MLflow run
                summary = step_federate(arm_cfg, out, seed, init, data, idle)
                tracker.log_arm(arm, arm_cfg, seed, out)
                results["arms"].setdefault(arm, {})[str(seed)] = {
                    "dir": str(out.relative_to(run_dir)),
                    "final_accuracy": run_accuracy(
                        summary
                    ),  # the isolated control's: its mean client accuracy
                }
    results["wall_time_s"] = time.perf_counter() - t0
    results["resumed"] = resumed
    report = write_report(run_dir, results)
    tracker.finish(report)
    return {"results": results, "report": report}


def _init_key(init: Path | None, pretrained: Path) -> str:
    """The part of an FL folder's key naming where it starts (the pretrain folder's name, as before)."""
    if init is None:
        return "random"
    return pretrained.parent.name if init == pretrained else init.stem


def new_run_dir(cfg: RunConfig, output: str | None) -> Path:
    if output:
        return Path(output)
    return cfg.output_dir / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_command(args) -> int:
    from gptfl_ray.data.features import to_tensors
    from gptfl_ray.ray_env import ray_for
    from gptfl_ray.report import print_summary_table
    from gptfl_ray.validate import check_data, check_output_dir

    cfg: RunConfig = args.cfg  # validated whole (every step and arm) by the CLI before this
    source = f"{args.config}{' with its --set options' if args.overrides else ''}"
    if args.resume:
        run_dir = Path(args.resume)
        if args.output and Path(args.output) != run_dir:
            raise ConfigError(f"--output {args.output}: --resume {run_dir} names the run folder already")
        if not (run_dir / "config.yaml").is_file():
            raise InputNotFoundError(f"{run_dir / 'config.yaml'}: not a run folder (no config.yaml)")
    else:
        run_dir = new_run_dir(cfg, args.output)
    check_output_dir(run_dir, "run folder")
    check_resume(cfg, run_dir, source)  # CONFIG must be the run's own config (also for --output RUN_DIR)
    # Before Ray and hours of generation: the real data, and every seed's client partition.
    splits = check_data(cfg, cfg.seeds)
    test = to_tensors(splits.test, cfg.data.dataset, cfg.data.audio)
    with ray_for(cfg.ray_address, announce=True):
        print(f"run folder: {run_dir}", flush=True)
        out = run(cfg, run_dir, test=test)
    print_summary_table(out["results"], run_dir)
    print(f"report: {out['report']}")
    return 0
