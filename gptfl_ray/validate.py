"""Fail at once: everything a run's steps would check later, checked before any work (and before Ray) starts.

``validate_run(cfg)`` checks the config alone (every step's settings, every arm); ``check_data(cfg, seeds)``
then loads the real dataset and draws each seed's client partition. Every command calls them first
(``gptfl_ray.cli``), and a sweep calls ``validate_run`` for every grid point, so a typo in the last baseline's
strategy, an unusable generator option or a partition that cannot be drawn fails in seconds, not after hours of
generation and pretraining. Each check is the step's own code (strategy construction, option parsing, prompt
table, model construction), run on a tiny stand-in, so the two cannot disagree.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptfl_ray.config import ConfigError, ModelConfig, RunConfig
from gptfl_ray.errors import InputError, InputNotFoundError, shorten

if TYPE_CHECKING:
    from gptfl_ray.data.base import Splits

STEPS = ("labels", "generate", "pretrain", "federate")


def validate_run(cfg: RunConfig, *, steps: Iterable[str] = STEPS, baselines: bool = True) -> None:
    """Raise a one-line ``ConfigError`` naming the field for any setting a step of ``steps`` would refuse.

    ``baselines``: also check every ``baselines:`` arm (their ``fl`` overrides and strategies).
    Reads no data and starts nothing.
    """
    steps = set(steps)
    unknown = steps - set(STEPS)
    if unknown:
        raise ValueError(f"validate_run: unknown steps {sorted(unknown)}")
    _dataset_spec(cfg)
    if "labels" in steps:
        check_labels(cfg)
    # Each check is a pure function of the sections it reads: a sweep's grid points share most of them.
    if "generate" in steps:
        _once(check_generate, cfg, cfg.data, cfg.labels, cfg.prompts, cfg.generate)
    if steps & {"pretrain", "federate"}:
        _once(check_model, cfg, cfg.data, cfg.model)
    if "federate" in steps:
        arms = [b.model_dump(mode="json") for b in cfg.baselines] if baselines else None
        _once(check_arms, cfg, cfg.data, cfg.fl, cfg.public_data, arms, baselines=baselines)


_PASSED: set[str] = set()


def _once(check, cfg: RunConfig, *sections: Any, **kwargs: Any) -> None:
    """Run ``check(cfg, **kwargs)`` unless it already passed for the same ``sections``."""
    from gptfl_ray.config import config_hash

    key = config_hash(check.__name__, *sections, kwargs)
    if key not in _PASSED:
        check(cfg, **kwargs)
        _PASSED.add(key)


def _dataset_spec(cfg: RunConfig):
    from gptfl_ray.data.base import get_spec

    try:
        return get_spec(cfg.data, cfg.data_dir)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_labels(cfg: RunConfig, collect: bool | None = None) -> None:
    """Step 1: the label source has what it needs; a private collection (``collect``, default: when
    ``labels.source`` is ``collect``) can carry the dataset's labels."""
    lc = cfg.labels
    if lc.source == "config" and not lc.names:
        raise ConfigError("labels.names: required when labels.source is 'config'")
    if lc.names and len(set(lc.names)) != len(lc.names):
        dupes = sorted({n for n in lc.names if lc.names.count(n) > 1})
        raise ConfigError(f"labels.names: duplicate label names {shorten(repr(dupes), 120)}")
    if lc.names and not all(lc.names):
        raise ConfigError("labels.names: empty label name")
    if collect if collect is not None else lc.source == "collect":
        names = list(_dataset_spec(cfg).label_names)
        if len(names) > lc.iblt_capacity:
            raise ConfigError(
                f"labels.iblt_capacity: {cfg.data.dataset} has {len(names)} labels: {len(names)} distinct labels "
                f"exceed the table capacity {lc.iblt_capacity} (raise labels.iblt_capacity)"
            )
        too_long = [n for n in names if len(n.encode()) > lc.iblt_max_label_bytes]
        if too_long:
            raise ConfigError(
                f"labels.iblt_max_label_bytes: {lc.iblt_max_label_bytes} is below the label "
                f"{shorten(too_long[0], 40)!r} ({len(too_long[0].encode())} UTF-8 bytes)"
            )


def check_generate(cfg: RunConfig) -> None:
    """Step 2: the generator exists, takes its options and makes the task's kind of data; the prompt templates
    and the expander backend are usable (the prompt table is built for one sample per class)."""
    from gptfl_ray.generate.pipeline import task_target
    from gptfl_ray.generate.registry import get_generator
    from gptfl_ray.prompts.expand import check_backend_config
    from gptfl_ray.prompts.templates import build_prompt_table

    spec = _dataset_spec(cfg)
    gen_cls = get_generator(cfg.generate.generator)
    options = gen_cls.parse_options(cfg.generate.options)
    names = list(cfg.labels.names or spec.label_names or ["label"])
    target = task_target(cfg, gen_cls, options, names)
    check_expander_fits(cfg, target.modality)
    check_backend_config(cfg.prompts.expander)
    if cfg.prompts.num_per_class is None and cfg.prompts.scale is None:
        raise ConfigError("prompts.num_per_class: set it (or prompts.scale with the real class counts)")
    one_each = cfg.prompts.model_copy(update={"num_per_class": 1})
    label_text = dict(zip(names, target.label_text, strict=True))
    build_prompt_table(one_each, names, modality=target.modality, label_text=label_text)


def check_expander_fits(cfg: RunConfig, modality: str) -> None:
    """LLM expansion rewrites prompts for image and audio generators; a speech generator speaks the label and a
    text generator's prompt is its instruction (an expanded prompt would be an utterance, not an instruction)."""
    if modality in ("speech", "text") and cfg.prompts.expander.backend != "templates":
        what = (
            "speak the label text itself"
            if modality == "speech"
            else "take the template as their instruction"
        )
        raise ConfigError(
            f"prompts.expander.backend: {modality} generators {what}; LLM expansion "
            "applies to image and audio prompts (use backend: templates)"
        )


def check_model(cfg: RunConfig, model: ModelConfig | None = None, field: str = "model") -> None:
    """Steps 3-4: ``model`` (default ``cfg.model``; named ``field`` in errors) builds for the dataset's inputs
    and runs a forward pass (on the meta device: shapes only, no memory, no compute)."""
    import torch

    from gptfl_ray.data.features import input_shape
    from gptfl_ray.models import build_model

    model = model or cfg.model
    spec = _dataset_spec(cfg)
    shape = input_shape(cfg.data, cfg.data.audio, cfg.data_dir)
    try:
        with torch.device("meta"):
            net = build_model(model.name, spec.num_classes, shape, width=model.width)
            net.eval()(torch.empty((2, *shape)))
    except ConfigError:  # a module:callable model that does not import or build: already one line
        raise
    except (ValueError, RuntimeError) as err:
        text = str(err).strip()
        first = shorten(text.splitlines()[0].removeprefix("model: ") if text else type(err).__name__, 200)
        raise ConfigError(
            f"{field}.name: {model.name!r} does not fit {cfg.data.dataset} inputs {tuple(shape)}: {first}"
        ) from None
    if model.weights is not None:  # the file reads and its keys and shapes fit (head shapes may differ)
        from gptfl_ray.models.weights import match_weights, read_state_dict

        match_weights(net, read_state_dict(model.weights), model.weights)


def check_arms(cfg: RunConfig, *, baselines: bool = True) -> None:
    """Step 4 for every arm: the baseline's ``fl`` overrides validate, the strategy takes its parameters, secure
    aggregation supports it."""
    from gptfl_ray.fl.runner import check_fl_config
    from gptfl_ray.run import GPTFL_ARM, arms

    for name, arm_cfg, _ in arms(cfg) if baselines else [(GPTFL_ARM, cfg, True)]:
        try:
            check_fl_config(arm_cfg)
            if arm_cfg.fl.client_model is not None:
                check_model(arm_cfg, arm_cfg.fl.client_model, "fl.client_model")
        except ConfigError as err:
            if name == GPTFL_ARM:
                raise
            raise ConfigError(f"baselines[{name}]: {err}") from None


def check_data(cfg: RunConfig, seeds: Iterable[int], splits: Splits | None = None) -> Splits:
    """Load the real dataset (missing files: one line saying what to put where) unless ``splits`` is given, and
    draw the client partition of every seed; returns the dataset's splits."""
    import numpy as np

    from gptfl_ray.data import load_dataset
    from gptfl_ray.data.partition import partition
    from gptfl_ray.fl.data import public_holdout

    splits = splits or load_dataset(cfg.data, cfg.data_dir)
    labels, groups = np.asarray(splits.train.y), splits.train.groups
    if cfg.public_data.source == "holdout":  # the public set leaves the pool before partitioning
        _, keep = public_holdout(len(labels), cfg.public_data.num, cfg.public_data.seed)
        labels, groups = labels[keep], None if groups is None else groups[keep]
    for seed in seeds:
        partition(cfg.partition, labels, groups, seed=seed)
    return splits


def check_points_data(points: list[dict[str, Any]]) -> None:
    """``check_data`` for a sweep's grid points: each distinct dataset loaded once, each distinct partition and
    seed drawn once."""
    from gptfl_ray.config import config_hash

    loaded: dict[str, Splits] = {}
    drawn: set[str] = set()
    for p in points:
        cfg = RunConfig.model_validate(p["run"])
        dkey = config_hash(cfg.data, str(cfg.data_dir))
        pkey = config_hash(dkey, cfg.partition, cfg.public_data, p["seed"])
        if pkey not in drawn:
            loaded[dkey] = check_data(cfg, [p["seed"]], loaded.get(dkey))
            drawn.add(pkey)


def check_synthetic(folder: str | Path, cfg: RunConfig) -> None:
    """A finished synthetic data folder whose data fits ``cfg.data`` (the checks ``gptfl pretrain`` makes)."""
    from gptfl_ray.data import synthetic

    manifest = synthetic.read_manifest(folder)
    synthetic.shard_files(folder, manifest)
    synthetic._check_task(folder, manifest, cfg.data)
    synthetic.class_index(manifest, cfg.data)


def check_run_folder(run_dir: str | Path) -> None:
    """A finished run (or sweep) folder that ``gptfl report`` can read: its results index and every arm's summary."""
    from gptfl_ray.io import read_json

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "not a folder" if run_dir.exists() else "no such folder"
        raise InputNotFoundError(f"{run_dir}: {what} (expected a run folder written by `gptfl run`)")
    index = run_dir / "results.json"
    if not index.is_file():
        raise InputNotFoundError(f"{index}: not a finished run folder (no results.json)")
    results = read_json(index)
    if not isinstance(results, dict) or not isinstance(results.get("arms"), dict):
        raise InputError(f'{index}: not a gptfl results index (no "arms" mapping)')
    for arm, by_seed in results["arms"].items():
        entries = by_seed.items() if isinstance(by_seed, dict) else [("?", None)]
        for seed, entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("dir"), str):
                raise InputError(f"{index}: arms.{arm}: not a gptfl results index (no run folder per seed)")
            folder = run_dir / entry["dir"]
            if not (folder / "summary.json").is_file():
                raise InputNotFoundError(f"{folder}: summary.json of arm {arm} seed {seed} missing")


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """A configured ``ray_address`` must accept a connection: ``ray.init`` would otherwise retry for minutes."""
    if not address or address in ("auto", "local"):
        return
    scheme, _, rest = address.rpartition("://")
    host, sep, port = rest.rstrip("/").rpartition(":")
    if scheme not in ("", "ray") or not sep or not port.isdigit():
        return  # a form Ray resolves itself
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, OverflowError) as err:
        why = getattr(err, "strerror", None) or type(err).__name__
        raise ConfigError(
            f"ray_address: cannot reach {shorten(host, 80)}:{port} ({why}); is the Ray cluster up? "
            "(unset ray_address for a local Ray)"
        ) from None


def check_output_dir(path: str | Path, what: str = "output folder") -> None:
    """``path`` is a folder, or can be made one, and is writable: found now rather than after Ray started."""
    folder = Path(path).absolute()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{path}: exists and is not a folder (the {what})")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{path}: {existing} is a file, not a folder (the {what})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{path}: {existing} is not writable (the {what})")


__all__ = [
    "STEPS",
    "check_data",
    "check_output_dir",
    "check_points_data",
    "check_ray_address",
    "check_run_folder",
    "check_synthetic",
    "validate_run",
]
