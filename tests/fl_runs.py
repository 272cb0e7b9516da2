"""Tiny end-to-end FL runs in tests: the shared MNIST config and a run / resume bit-identity check."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gptfl_ray.config import RunConfig, validate_config
from gptfl_ray.fl.pool import IdleActors
from gptfl_ray.fl.runner import run_federated
from gptfl_ray.io import load_weights, read_jsonl

# 600 MNIST training images over 6 clients, 3 a round, 2 rounds: a few seconds a run on CPU.
TINY_FL: dict[str, Any] = {
    "data": {"dataset": "mnist", "test_split": "holdout", "num_test": 200, "num_train": 600},
    "partition": {"method": "dirichlet", "num_clients": 6, "alpha": 0.5},
    "model": {"name": "convnet", "width": 8},
    "fl": {
        "rounds": 2,
        "clients_per_round": 3,
        "checkpoint_every": 1,
        "local": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05}},
        "num_actors": 1,
    },
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over``: nested dicts merge key by key, except that a dict with a ``name`` (a model,
    strategy or optimizer: a new choice) replaces the old one whole."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and "name" not in value:
            out[key] = _merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_raw(
    strategy: dict[str, Any], *, fl: dict[str, Any] | None = None, **sections: Any
) -> dict[str, Any]:
    """:data:`TINY_FL` with ``fl.strategy = strategy``, then ``fl`` merged into ``fl`` (a ``strategy`` there
    wins) and each of ``sections`` (``public_data``, ``model``, ...) into its section; the raw dict."""
    return _merge(TINY_FL, {**sections, "fl": {"strategy": strategy, **(fl or {})}})


def tiny_config(strategy: dict[str, Any], *, fl: dict[str, Any] | None = None, **sections: Any) -> RunConfig:
    """:func:`tiny_raw`, validated."""
    return validate_config(tiny_raw(strategy, fl=fl, **sections))


def run_and_resume(make_cfg: Callable[..., RunConfig], tmp_path: Path, seed: int = 0) -> list[dict[str, Any]]:
    """``make_cfg()`` run to the end in ``tmp_path/"full"``; ``make_cfg(rounds=1)`` in ``tmp_path/"part"``, then
    resumed there with ``make_cfg()``. Asserts that both give the same final accuracy, bit-identical
    ``final.safetensors`` and the same per-round accuracy and ``strategy_info`` (bar its seconds); returns the
    full run's metrics records."""
    full_dir, part_dir = Path(tmp_path) / "full", Path(tmp_path) / "part"
    # The three runs share one set of client actors, each run adopting the previous one's (as the arms of a seed
    # in `gptfl run` do): one actor start-up instead of three, and resume is checked on reused actors.
    with IdleActors() as idle:
        full = run_federated(make_cfg(), seed=seed, out_dir=full_dir, idle=idle)
        run_federated(make_cfg(rounds=1), seed=seed, out_dir=part_dir, idle=idle)
        resumed = run_federated(make_cfg(), seed=seed, out_dir=part_dir, resume=True, idle=idle)
    assert resumed["final_accuracy"] == full["final_accuracy"]

    a, b = load_weights(full_dir / "final.safetensors"), load_weights(part_dir / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    recs, part = read_jsonl(full_dir / "metrics.jsonl"), read_jsonl(part_dir / "metrics.jsonl")
    assert [r["round"] for r in part] == [r["round"] for r in recs]
    assert [r["accuracy"] for r in part] == [r["accuracy"] for r in recs]
    assert [_untimed(r["strategy_info"]) for r in part] == [_untimed(r["strategy_info"]) for r in recs]
    return recs


def _untimed(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` with the values of its seconds (keys ending in ``_s``, e.g. DynaFed's ``match_s``) blanked: those
    differ between any two runs; the keys themselves must still match."""
    return {k: None if k.endswith("_s") else v for k, v in info.items()}
