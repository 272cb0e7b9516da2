"""Step 4 of GPT-FL: ``run_federated`` (Python API) and ``gptfl federate`` (CLI).

One run folder holds::

    run.json            seed, init weights, the config (a resume checks it is compatible)
    metrics.jsonl       one line per round (per client in isolated mode)
    events.jsonl        actor deaths, hung tasks (past fl.task_timeout_s), rejected updates, skipped rounds
    checkpoint/         see gptfl_ray.fl.checkpoint
    state/              per-virtual-client strategy state (SCAFFOLD), versioned with the checkpoints
    final.safetensors   final global weights (a state dict of cfg.model)
    summary.json        the run's result (keys in gptfl_ray.fl.metrics.summarize)
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
import torch

from gptfl_ray.config import ConfigError, RunConfig, dump_config
from gptfl_ray.data.base import get_spec
from gptfl_ray.errors import InputError, InputNotFoundError
from gptfl_ray.fl.checkpoint import (
    Checkpoint,
    check_checkpoint,
    latest_round,
    load_checkpoint,
    save_checkpoint,
)
from gptfl_ray.fl.client import ClientSpec, FLClient
from gptfl_ray.fl.data import FederatedData, prepare_federated_data
from gptfl_ray.fl.flat import VectorLayout
from gptfl_ray.fl.isolated import run_isolated
from gptfl_ray.fl.metrics import Progress, summarize
from gptfl_ray.fl.pool import ActorKind, ClientPool, IdleActors, TaskDeadlines, actor_namespace
from gptfl_ray.fl.server import FederatedServer
from gptfl_ray.fl.strategies import ServerContext, Strategy, build_strategy, strategy_class
from gptfl_ray.io import (
    append_jsonl,
    atomic_write_json,
    check_weights,
    load_weights,
    read_json,
    save_weights,
    write_jsonl,
)
from gptfl_ray.models import build_model
from gptfl_ray.models.registry import plugin_models

__all__ = ["FederatedData", "federate_command", "prepare_federated_data", "run_federated"]

log = logging.getLogger(__name__)

RUN_META = "run.json"
# FL settings a resume may change: they do not change the weights the run computes.
RESUMABLE_FL_FIELDS = {
    "rounds",
    "checkpoint_every",
    "eval_every",
    "eval_batch_size",
    "num_actors",
    "actor_num_cpus",
    "actor_num_gpus",
    "client_retries",
    "max_actor_replacements",
    "target_accuracy",
    "secagg_timeout_s",
    "task_timeout_s",
}


def run_federated(
    cfg: RunConfig,
    *,
    seed: int,
    out_dir: Path,
    init_weights: Path | None = None,
    resume: bool = False,
    data: FederatedData | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    client_cls: type[FLClient] = FLClient,
    synthetic_dir: Path | None = None,
    on_round_overlaps: bool = False,
    idle: IdleActors | None = None,
) -> dict[str, Any]:
    """Run FL (or the client-isolated control when ``cfg.fl.mode == "isolated"``) into ``out_dir``.

    A round's evaluation runs alongside the next round's training (the metrics stay the same, in round
    order). ``on_round(record)`` is called after every evaluated round, before the next round starts, so it
    may stop the run with no later work begun; that costs the overlap, unless ``on_round_overlaps`` lets it run
    while the next round trains (progress reporting). ``resume`` continues from the last checkpoint in
    ``out_dir`` (from scratch if there is none); ``synthetic_dir``: the generated data, for
    ``public_data.source: synthetic``; ``idle``: client actors of earlier runs to adopt, and where this run's go
    when it finishes (see ``pool.IdleActors``). Returns the summary dict.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    strategy = check_fl_config(cfg)
    ckpt_root = out_dir / "checkpoint"
    has_checkpoint = latest_round(ckpt_root) is not None
    if resume:
        init_weights = _check_resume(out_dir, cfg, seed, init_weights)
    elif has_checkpoint:
        raise InputError(
            f"{out_dir}: already holds an FL run with checkpoints; resume it (--resume) or choose another folder"
        )
    if not resume or (cfg.fl.mode == "federated" and not has_checkpoint):
        _clear_run_folder(out_dir)
    init_label = str(init_weights) if init_weights else "random"
    atomic_write_json(out_dir / RUN_META, {"seed": seed, "init": init_label, "config": dump_config(cfg)})

    data = data or prepare_federated_data(cfg, seed, synthetic_dir=synthetic_dir)
    torch.manual_seed(seed)
    model = build_model(cfg.model.name, data.num_classes, data.input_shape, width=cfg.model.width)
    if init_weights:
        _load_init(model, Path(init_weights), cfg)
    if cfg.fl.secure_aggregation and cfg.fl.mode == "federated":
        from gptfl_ray.fl.secure import secure_client_class

        client_cls = secure_client_class(client_cls)
    workers = LazyPool(cfg, data, out_dir, client_cls, idle)
    try:
        if cfg.fl.mode == "isolated":
            x = VectorLayout.of(model).to_vector(model.state_dict())
            summary = run_isolated(
                cfg.fl, data, workers.get, x, seed=seed, metrics_path=out_dir / "metrics.jsonl"
            )
            summary.update(strategy="isolated", seed=seed, init=init_label)
        else:
            summary = _run_rounds(
                cfg,
                data,
                strategy,
                model,
                workers,
                seed=seed,
                out_dir=out_dir,
                resume=resume,
                init_label=init_label,
                t_start=t_start,
                on_round=on_round,
                on_round_overlaps=on_round_overlaps,
            )
        atomic_write_json(out_dir / "summary.json", summary)
        workers.close(finished=True)
        return summary
    finally:
        workers.close()


class LazyPool:
    """The run's client actors (and Ray itself), started on first use: a finished run resumes instantly."""

    def __init__(
        self,
        cfg: RunConfig,
        data: FederatedData,
        out_dir: Path,
        client_cls: type[FLClient],
        idle: IdleActors | None = None,
    ):
        self.cfg, self.data, self.out_dir, self.client_cls = cfg, data, out_dir, client_cls
        self.idle = idle  # where the actors come from and go back to, when the caller keeps them
        self.on_event = _event_log(out_dir / "events.jsonl")
        self.pool: ClientPool | None = None
        self.ready = False
        self.started_ray = False

    def get(self) -> ClientPool:
        """The pool, its actors ready (their model built)."""
        if self.pool is None:
            self.start()
        if not self.ready:
            self.pool.wait_ready()
            self.ready = True
        return self.pool

    def start(self) -> ClientPool:
        """The pool, its actors starting (in the background: the driver goes on with its own set-up)."""
        if self.pool is None:
            cfg, fl = self.cfg, self.cfg.fl
            self.started_ray = _ensure_ray(cfg)
            client_model = fl.client_model or cfg.model
            spec = ClientSpec(
                model=client_model.name,
                num_classes=self.data.num_classes,
                input_shape=self.data.input_shape,
                width=client_model.width,
                local=fl.local,
                strategy=fl.strategy,
                eval_batch_size=fl.eval_batch_size,
                num_cpus=fl.actor_num_cpus,
                use_gpu=fl.actor_num_gpus > 0,
                eval_model=cfg.model.name if fl.client_model else None,
                eval_width=cfg.model.width if fl.client_model else None,
                strategy_class=strategy_class(fl.strategy.name),
                models=plugin_models([client_model.name, cfg.model.name]),
            )
            kind = ActorKind(self.client_cls, fl.actor_num_cpus, fl.actor_num_gpus)
            self.pool = ClientPool(
                spec,
                fl.num_actors,
                adopt=self.idle.take(kind, fl.num_actors) if self.idle is not None else None,
                num_cpus=fl.actor_num_cpus,
                num_gpus=fl.actor_num_gpus,
                namespace=actor_namespace(self.out_dir),
                max_replacements=fl.max_actor_replacements,
                actor_cls=self.client_cls,
                on_event=self.on_event,
                deadlines=TaskDeadlines(fl.task_timeout_s),
            )
        return self.pool

    def close(self, finished: bool = False) -> None:
        """Stop the actors, or give them to ``idle`` when the run ``finished`` (nothing in flight)."""
        if self.pool is not None:
            if finished and self.idle is not None and not self.started_ray:
                self.idle.give(self.pool.kind, self.pool.release())
            else:
                self.pool.shutdown()
            self.pool, self.ready = None, False
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def _run_rounds(
    cfg: RunConfig,
    data: FederatedData,
    strategy: Strategy,
    model: torch.nn.Module,
    workers: LazyPool,
    *,
    seed: int,
    out_dir: Path,
    resume: bool,
    init_label: str,
    t_start: float,
    on_round: Callable[[dict[str, Any]], None] | None,
    on_round_overlaps: bool,
) -> dict[str, Any]:
    fl = cfg.fl
    ckpt_root, metrics_path = out_dir / "checkpoint", out_dir / "metrics.jsonl"
    ckpt = load_checkpoint(ckpt_root) if resume else None
    if (ckpt.round if ckpt is not None else 0) < fl.rounds:
        workers.start()  # the actors start up (imports, model) while the driver sets up below
    layout, template = VectorLayout.of(model), model.state_dict()
    x = layout.to_vector(template)
    strategy.setup(
        client_layout(cfg, data, layout),
        data.num_clients,
        out_dir / "state",
        server_context(cfg, data, seed, layout),
    )
    progress = Progress(fl.target_accuracy, fl.target_metric)
    records: list[dict[str, Any]] = []
    start = 0
    if ckpt is not None:
        x = layout.to_vector(ckpt.global_state)
        strategy.load_state_dict(ckpt.strategy_tensors, ckpt.state["strategy"])
        progress.load(ckpt.state["progress"])
        progress.target = fl.target_accuracy
        records, start = ckpt.metrics, ckpt.round
        write_jsonl(metrics_path, records)  # drop the lines of rounds after the checkpoint
        log.info("resuming %s after round %d of %d", out_dir, start, fl.rounds)

    if start < fl.rounds:
        # The data goes to the object store while the actors start; then wait for them.
        server = FederatedServer(fl, data, strategy, workers.start(), seed=seed, on_event=workers.on_event)
        workers.get()
        progress.elapsed_s += time.perf_counter() - t_start  # set-up: data, Ray, actors

    def close(done: _Trained, end: float | None) -> None:
        """Evaluate a trained round (when due), record it, commit its checkpoint (when due), call on_round."""
        rec, rnd = done.rec, done.rnd
        if rnd % fl.eval_every == 0 or rnd == fl.rounds:
            t1 = time.perf_counter()
            rec.update(server.evaluate(done.x))
            rec["eval_s"] = time.perf_counter() - t1
        rec["wall_time_s"] = (time.perf_counter() if end is None else end) - done.t0
        progress.add_round(rec)
        records.append(rec)
        append_jsonl(metrics_path, rec)
        _log_round(rec, fl.rounds, fl.target_metric)
        if done.strategy_state is not None:
            tensors, meta = done.strategy_state
            state = {
                "seed": seed,
                "progress": progress.state(),
                "strategy": meta,
                # Client sampling and local training are seeded by (seed, round, client): the RNG state
                # of a run after round r is fully described by (seed, r).
                "rng": {"seed": seed, "next_round": rnd + 1},
            }
            save_checkpoint(
                ckpt_root, Checkpoint(rnd, layout.to_state_dict(done.x, template), tensors, state, records)
            )
            strategy.checkpoint_committed()
        if on_round is not None and rec.get("accuracy") is not None:
            on_round(rec)

    # Round r's evaluation, record and checkpoint run while round r+1 trains: its tasks are queued first and
    # the evaluation goes ahead of them on the actors. An on_round callback that does not allow the overlap
    # runs before round r+1 starts instead.
    overlap = on_round is None or on_round_overlaps
    done: _Trained | None = None
    for rnd in range(start + 1, fl.rounds + 1):
        if done is not None and not overlap:
            close(done, None)
            done = None
        t0 = time.perf_counter()
        run = server.start_round(rnd, x)
        if done is not None:
            close(done, t0)
        x, rec = server.finish_round(run)
        due = (fl.checkpoint_every and rnd % fl.checkpoint_every == 0) or rnd == fl.rounds
        done = _Trained(rnd, x, rec, t0, _snapshot(strategy) if due else None)
    if done is not None:
        close(done, None)

    save_weights(
        out_dir / "final.safetensors", layout.to_state_dict(x, template), metadata={"model": cfg.model.name}
    )
    return summarize(records, progress, strategy=fl.strategy.name, seed=seed, init=init_label)


@dataclass
class _Trained:
    """A round trained and aggregated whose evaluation, record and checkpoint are still to come."""

    rnd: int
    x: torch.Tensor  # the global weights after the round
    rec: dict[str, Any]
    t0: float  # when the round started
    strategy_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None  # after the round, if checkpointed


def _snapshot(strategy: Strategy) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The strategy's checkpoint state now (its tensors are copies), safe from the next round's changes."""
    tensors, meta = strategy.state_dict()
    return tensors, copy.deepcopy(meta)


# ------------------------------------------------------------------------------------------ helpers
def check_fl_config(cfg: RunConfig) -> Strategy:
    """Fail fast on FL settings that cannot run; returns the (validated) strategy."""
    strategy = build_strategy(cfg.fl.strategy)
    cls, name = type(strategy), cfg.fl.strategy.name
    if cfg.fl.mode == "federated" and cls.public_data != "none" and cfg.public_data.source == "none":
        raise ConfigError(
            f"public_data.source: fl.strategy.name={name!r} needs unlabeled public data: set it to 'holdout' "
            "(real samples held out of the pool, public_data.num) or 'synthetic' (the generated data)"
        )
    if cfg.fl.client_model is not None and cfg.fl.mode == "isolated":
        raise ConfigError(
            "fl.client_model: the client-isolated control (fl.mode: isolated) trains `model` itself"
        )
    if cfg.fl.client_model is not None and not cls.heterogeneous_models:
        raise ConfigError(
            f"fl.client_model: fl.strategy.name={name!r} trains the server's model on the clients (only "
            "strategies with heterogeneous models, e.g. fedet, take a client model)"
        )
    if cls.synthesizes_inputs and get_spec(cfg.data).modality == "text":
        raise ConfigError(
            f"fl.strategy.name: {name!r} learns synthetic inputs by gradient descent; a text dataset's inputs "
            "are token ids (use another algorithm for text)"
        )
    if cfg.fl.secure_aggregation:
        from gptfl_ray.fl.secure import check_secure_config

        check_secure_config(cfg.fl, strategy)
    return strategy


def _build(cfg: RunConfig, data: FederatedData, model_cfg) -> torch.nn.Module:
    return build_model(model_cfg.name, data.num_classes, data.input_shape, width=model_cfg.width)


def client_layout(cfg: RunConfig, data: FederatedData, server_layout: VectorLayout) -> VectorLayout:
    """Layout of the vector clients train: ``fl.client_model``'s, else the server model's own."""
    if cfg.fl.client_model is None:
        return server_layout
    return VectorLayout.of(_build(cfg, data, cfg.fl.client_model))


def server_context(
    cfg: RunConfig, data: FederatedData, seed: int, server_layout: VectorLayout
) -> ServerContext:
    """What a strategy's server half may use: model builders, device, the public data, the seed."""
    from gptfl_ray.fl.strategies import PublicData

    client_model = cfg.fl.client_model or cfg.model
    init_client = None
    if cfg.fl.client_model is not None:  # the clients' initial model: seeded like the server's
        torch.manual_seed(seed + 1)
        m = _build(cfg, data, client_model)
        init_client = VectorLayout.of(m).to_vector(m.state_dict())
    return ServerContext(
        build_model=lambda: _build(cfg, data, cfg.model),
        build_client_model=lambda: _build(cfg, data, client_model),
        server_layout=server_layout,
        device=torch.device("cpu"),
        seed=seed,
        num_classes=data.num_classes,
        client_sizes=data.client_sizes(),
        public=None if data.public is None else PublicData(data.public, cfg.public_data.source),
        init_client_weights=init_client,
        input_shape=tuple(data.input_shape),
    )


F1_SHORT = {"weighted_f1": "wF1", "macro_f1": "mF1"}


def _log_round(rec: dict[str, Any], rounds: int, metric: str = "accuracy") -> None:
    from gptfl_ray.console import eta, progress

    acc = ""
    if rec.get("accuracy") is not None:
        target = (
            f"{F1_SHORT[metric]} {rec[metric]:.4f} "
            if rec.get(metric) is not None and metric in F1_SHORT
            else ""
        )
        acc = f"acc {rec['accuracy']:.4f} {target}loss {rec['loss']:.4f} | "
    log.info(
        "round %d/%d: %s%d updates, %d rejected, %d failed%s | %.2f s, %.1f MB total%s",
        rec["round"],
        rounds,
        acc,
        rec["num_updates"],
        len(rec["rejected"]),
        len(rec["failed_clients"]),
        " (skipped)" if rec["skipped"] else "",
        rec["wall_time_s"],
        rec["cum_mb"],
        f", {eta(rec['round'], rounds, rec['elapsed_s'])}" if rec.get("elapsed_s") else "",
        extra=progress("FL rounds", rec["round"], rounds),
    )


def _event_log(path: Path) -> Callable[[dict[str, Any]], None]:
    def emit(event: dict[str, Any]) -> None:
        event = {"time": datetime.now().isoformat(timespec="seconds"), **event}
        log.warning("event: %s", " ".join(f"{k}={v}" for k, v in event.items() if k != "time"))
        append_jsonl(path, event)

    return emit


def _clear_run_folder(out_dir: Path) -> None:
    """A fresh run owns its folder: outputs of an earlier attempt that never checkpointed go."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "events.jsonl", "summary.json", "final.safetensors"):
        (out_dir / name).unlink(missing_ok=True)
    for name in ("state", "checkpoint"):
        shutil.rmtree(out_dir / name, ignore_errors=True)


def _check_resume(out_dir: Path, cfg: RunConfig, seed: int, init_weights: Path | None) -> Path | None:
    """The interrupted run's init weights; errors if seed or result-changing config differ."""
    meta_path = out_dir / RUN_META
    if not meta_path.is_file():
        raise InputNotFoundError(f"{meta_path}: not an FL run folder (nothing to resume)")
    meta = read_json(meta_path)
    if meta["seed"] != seed:
        raise ConfigError(f"{out_dir}: the run used seed {meta['seed']}, not {seed}")
    old, new = meta["config"], dump_config(cfg)
    defaults = dump_config(RunConfig())  # sections a run folder from an older version did not record
    changed = [s for s in ("data", "partition", "model", "public_data") if old.get(s, defaults[s]) != new[s]]
    changed += [
        f"fl.{k}"
        for k in sorted(set(old.get("fl", {})) | set(new["fl"]))
        if k not in RESUMABLE_FL_FIELDS and old.get("fl", {}).get(k) != new["fl"].get(k)
    ]
    if changed:
        raise ConfigError(f"{out_dir}: cannot resume with a different {', '.join(changed)} (see {RUN_META})")
    saved_init = None if meta["init"] == "random" else Path(meta["init"])
    if init_weights is not None and (
        saved_init is None or Path(init_weights).resolve() != saved_init.resolve()
    ):
        raise ConfigError(
            f"{out_dir}: the run started from {saved_init or 'random init'}, not {init_weights}"
        )
    return saved_init


def _load_init(model: torch.nn.Module, path: Path, cfg: RunConfig) -> None:
    state = load_weights(path)
    ref = model.state_dict()
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(ref[k].shape)}"
        for k in ref
        if k in state and state[k].shape != ref[k].shape
    ]
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{what}: {', '.join(items[:3])}{' …' if len(items) > 3 else ''}"
            for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
            if items
        )
        raise InputError(f"{path}: weights do not fit model.name={cfg.model.name!r} ({detail})")
    model.load_state_dict(state)


def _ensure_ray(cfg: RunConfig) -> bool:
    """Connect to Ray if needed; True when this call started it (and so must shut it down)."""
    if ray.is_initialized():
        started = False
    else:
        from gptfl_ray.ray_env import ensure_ray

        started = ensure_ray(cfg.ray_address, announce=True, data=False) is not None
    cpus = ray.cluster_resources().get("CPU", 0)
    want = cfg.fl.num_actors * cfg.fl.actor_num_cpus
    if want > cpus:
        log.warning(
            "fl: %d actors × %g CPUs = %g CPUs, the cluster has %g: some actors wait for resources",
            cfg.fl.num_actors,
            cfg.fl.actor_num_cpus,
            want,
            cpus,
        )
    return started


def federate_command(args) -> int:
    """``gptfl federate CONFIG [--init WEIGHTS] [--resume RUN_DIR] [--output RUN_DIR] [--seed N]``."""
    cfg: RunConfig = args.cfg
    check_fl_config(cfg)
    if args.resume:
        out_dir = Path(args.resume)
        meta_path = out_dir / RUN_META
        if not meta_path.is_file():
            raise InputNotFoundError(f"{meta_path}: not an FL run folder (nothing to resume)")
        seed = args.seed if args.seed is not None else read_json(meta_path)["seed"]
    else:
        seed = args.seed if args.seed is not None else cfg.seeds[0]
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = Path(args.output) if args.output else cfg.output_dir / f"{cfg.name}-fl-seed{seed}-{stamp}"
    init = Path(args.init) if args.init else None
    if init is not None and not init.is_file():
        raise InputNotFoundError(f"{init}: --init weights file not found")
    # Unreadable inputs (an empty or torn weights file, e.g. after a power loss) fail here, before any work.
    if init is not None:
        check_weights(init)
    if args.resume:
        check_checkpoint(out_dir / "checkpoint")
    print(f"FL run folder: {out_dir}", flush=True)
    synthetic = Path(args.synthetic) if getattr(args, "synthetic", None) else None  # checked by the CLI
    data = prepare_federated_data(cfg, seed, getattr(args, "data_dir", None), synthetic)
    s = run_federated(cfg, seed=seed, out_dir=out_dir, init_weights=init, resume=bool(args.resume), data=data)
    if cfg.fl.mode == "isolated":
        print(
            f"isolated: accuracy {s['isolated_mean_accuracy']:.4f} ± {s['isolated_std_accuracy']:.4f} "
            f"over {len(s['isolated_accuracies'])} clients"
        )
    else:
        target = f", target reached in round {s['rounds_to_target']}" if s["rounds_to_target"] else ""
        print(
            f"{s['strategy']}: final accuracy {s['final_accuracy']:.4f} (best {s['best_accuracy']:.4f}) "
            f"after {s['rounds']} rounds, {s['total_mb']:.1f} MB{target}; {s['wall_time_s']:.1f} s"
        )
    return 0
