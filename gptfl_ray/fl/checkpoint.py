"""FL checkpoints: one folder per checkpointed round, committed by an atomic pointer file.

    checkpoint/round-000010/global.safetensors   global weights (a state dict: usable as init weights)
                           /strategy.safetensors server state tensors (momenta, SCAFFOLD's c)
                           /state.json           round, progress totals, RNG, strategy metadata
                           /metrics.jsonl        metrics of rounds 1..10
    checkpoint/latest.json                       {"round": 10, "dir": "round-000010"}  <- commit point

Commit order, each step durable (fsynced file and directory) before the next starts: the new round folder and
every file in it -> ``latest.json`` -> deletion of older folders. So an interruption or a power loss at any
moment leaves ``latest.json`` pointing at a complete checkpoint. The checkpoint before the newest one is kept
as well (deleted at the next commit), a fallback should the newest be damaged later.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptfl_ray.errors import InputNotFoundError
from gptfl_ray.io import (
    atomic_write_json,
    check_weights,
    load_weights,
    make_dirs,
    read_json,
    read_jsonl,
    save_weights,
    write_jsonl,
)

LATEST = "latest.json"


@dataclass
class Checkpoint:
    round: int
    global_state: dict[str, torch.Tensor]
    strategy_tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    metrics: list[dict[str, Any]]


def save_checkpoint(root: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` durably, commit it (``latest.json``), then delete all but it and the previous one."""
    root = Path(root)
    folder = root / f"round-{ckpt.round:06d}"
    previous = read_json(root / LATEST)["dir"] if (root / LATEST).is_file() else None
    if folder.name == previous:
        raise ValueError(f"{folder}: is the committed checkpoint; refusing to overwrite it")
    if folder.exists():  # debris of an attempt interrupted before its commit
        shutil.rmtree(folder)
    make_dirs(folder)
    # Each write below fsyncs its file and then the folder: all of them are on disk before the pointer moves.
    save_weights(folder / "global.safetensors", ckpt.global_state)
    save_weights(folder / "strategy.safetensors", ckpt.strategy_tensors)
    write_jsonl(folder / "metrics.jsonl", ckpt.metrics)
    atomic_write_json(folder / "state.json", {"round": ckpt.round, **ckpt.state})
    atomic_write_json(root / LATEST, {"round": ckpt.round, "dir": folder.name})  # the commit (durable)
    for old in root.glob("round-*"):
        if old.is_dir() and old.name not in (folder.name, previous):
            shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_round(root: Path) -> int | None:
    return read_json(root / LATEST)["round"] if (root / LATEST).is_file() else None


def check_checkpoint(root: Path) -> None:
    """Fail fast, in one line naming the file, when the committed checkpoint under ``root`` is unreadable."""
    if not (root / LATEST).is_file():
        return
    folder = root / read_json(root / LATEST)["dir"]
    for name in ("global.safetensors", "strategy.safetensors"):
        check_weights(folder / name)
    if not (folder / "state.json").is_file():
        raise InputNotFoundError(f"{folder / 'state.json'}: checkpoint state not found")
    read_json(folder / "state.json")


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
