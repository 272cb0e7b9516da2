"""FL checkpoints: one folder per checkpointed round, committed by an atomic pointer file.

    checkpoint/round-000010/global.safetensors   global weights (a state dict: usable as init weights)
                           /strategy.safetensors server state tensors (momenta, SCAFFOLD's c)
                           /state.json           round, progress totals, RNG, strategy metadata
                           /metrics.jsonl        metrics of rounds 1..10
    checkpoint/latest.json                       {"round": 10, "dir": "round-000010"}  <- commit point

A checkpoint is written completely before ``latest.json`` is atomically replaced, so an interruption at any
moment leaves the previous checkpoint intact. Older round folders are deleted after the commit.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptfl_ray.io import atomic_write_json, load_weights, read_json, read_jsonl, save_weights, write_jsonl

LATEST = "latest.json"


@dataclass
class Checkpoint:
    round: int
    global_state: dict[str, torch.Tensor]
    strategy_tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    metrics: list[dict[str, Any]]


def save_checkpoint(root: Path, ckpt: Checkpoint) -> Path:
    folder = root / f"round-{ckpt.round:06d}"
    if folder.exists():  # debris of an attempt interrupted before its commit
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    save_weights(folder / "global.safetensors", ckpt.global_state)
    save_weights(folder / "strategy.safetensors", ckpt.strategy_tensors)
    write_jsonl(folder / "metrics.jsonl", ckpt.metrics)
    atomic_write_json(folder / "state.json", {"round": ckpt.round, **ckpt.state})
    atomic_write_json(root / LATEST, {"round": ckpt.round, "dir": folder.name})
    for old in root.glob("round-*"):
        if old.is_dir() and old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_round(root: Path) -> int | None:
    return read_json(root / LATEST)["round"] if (root / LATEST).is_file() else None


def load_checkpoint(root: Path) -> Checkpoint | None:
    """The last committed checkpoint under ``root``, or None if there is none."""
    if not (root / LATEST).is_file():
        return None
    folder = root / read_json(root / LATEST)["dir"]
    state = read_json(folder / "state.json")
    return Checkpoint(
        round=int(state.pop("round")),
        global_state=load_weights(folder / "global.safetensors"),
        strategy_tensors=load_weights(folder / "strategy.safetensors"),
        state=state,
        metrics=read_jsonl(folder / "metrics.jsonl"),
    )
