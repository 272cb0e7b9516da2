"""Durability: writes reach the disk before the names that point at them, checkpoints commit in order,
unreadable weights are one-line errors, and every wait on a client has a deadline."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from gptfl_ray.config import ConfigError, dump_config, load_config, validate_config
from gptfl_ray.fl.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from gptfl_ray.io import atomic_write_json, save_weights
from tests.cli_output import error_lines


class DiskLog:
    """Records fsyncs (by path), renames and tree deletions in the order they happen."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.events: list[tuple[str, ...]] = []
        real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

        def fsync(fd: int) -> None:
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def replace(src, dst) -> None:
            self.events.append(("replace", str(Path(src).resolve()), str(Path(dst).resolve())))
            real_replace(src, dst)

        def rmtree(path, *args, **kwargs) -> None:
            self.events.append(("rmtree", str(Path(path).resolve())))
            real_rmtree(path, *args, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(shutil, "rmtree", rmtree)

    def index(self, *event: str) -> int:
        return self.events.index(event)

    def committed(self, path: Path) -> int:
        """Asserts ``path`` was written durably: temp file fsynced, renamed, directory fsynced; returns the
        index of the directory fsync (after which the file survives a power loss)."""
        path = path.resolve()
        i = next(k for k, e in enumerate(self.events) if e[0] == "replace" and e[2] == str(path))
        tmp = self.events[i][1]
        assert ("fsync", tmp) in self.events[:i], f"{path.name}: renamed before its data was fsynced"
        after = self.events[i + 1 :]
        assert ("fsync", str(path.parent)) in after, f"{path.name}: directory not fsynced after the rename"
        return i + 1 + after.index(("fsync", str(path.parent)))


def ckpt(rnd: int) -> Checkpoint:
    return Checkpoint(
        rnd, {"w": torch.tensor([float(rnd)])}, {"m": torch.ones(2)}, {"progress": {}}, [{"round": 1}]
    )


# ------------------------------------------------------------------------------------ 1. fsync order
def test_every_atomic_writer_fsyncs_file_then_directory(tmp_path, monkeypatch):
    from gptfl_ray.generate.pipeline import ShardWriter, shard_path

    disk = DiskLog(monkeypatch)
    save_weights(tmp_path / "w" / "weights.safetensors", {"a": torch.zeros(3)})
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    writer = ShardWriter(tmp_path / "syn", {0: 3}, 3, {"generator": "test"})
    writer.add(pa.table({"row": pa.array([2, 0, 1], pa.int64()), "label": ["a", "b", "c"]}))
    disk.committed(tmp_path / "w" / "weights.safetensors")
    disk.committed(tmp_path / "x.json")
    shard = shard_path(tmp_path / "syn", 0)
    disk.committed(shard)
    # the folders created on the way are made durable in their parents before anything is renamed into them
    first_rename = disk.index("replace", *next(e[1:] for e in disk.events if e[0] == "replace"))
    assert ("fsync", str(tmp_path.resolve())) in disk.events[:first_rename]
    assert ("fsync", str(shard.parent.parent.resolve())) in disk.events


def test_checkpoint_folder_is_durable_before_the_pointer_moves(tmp_path, monkeypatch):
    root = tmp_path / "checkpoint"
    save_checkpoint(root, ckpt(2))
    save_checkpoint(root, ckpt(4))
    disk = DiskLog(monkeypatch)
    folder = save_checkpoint(root, ckpt(6)).resolve()
    names = ("global.safetensors", "strategy.safetensors", "metrics.jsonl", "state.json")
    files_durable = max(disk.committed(folder / n) for n in names)
    pointer = disk.committed(root / "latest.json")
    replace_latest = next(
        k for k, e in enumerate(disk.events) if e[0] == "replace" and e[2].endswith("latest.json")
    )
    assert files_durable < replace_latest < pointer
    assert disk.index("fsync", str(root.resolve())) < replace_latest  # the new folder's own entry
    # only after the commit is durable do older checkpoints go; the previous one (round 4) is kept
    deleted = [k for k, e in enumerate(disk.events) if e[0] == "rmtree"]
    assert deleted and all(k > pointer for k in deleted)
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "round-000004", "round-000006"]
    assert load_checkpoint(root).round == 6


def test_crash_before_the_pointer_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    root = tmp_path / "checkpoint"
    save_checkpoint(root, ckpt(2))
    save_checkpoint(root, ckpt(4))
    real_replace = os.replace

    def crash_at_commit(src, dst):
        if Path(dst).name == "latest.json":
            raise OSError("power loss")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_at_commit)
    with pytest.raises(OSError, match="power loss"):
        save_checkpoint(root, ckpt(6))
    monkeypatch.undo()
    c = load_checkpoint(root)
    assert c.round == 4 and c.global_state["w"].item() == 4.0
    assert (root / "round-000002").is_dir()  # the checkpoint before it is still there too
    save_checkpoint(root, ckpt(6))  # the debris of round 6 is replaced
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "round-000004", "round-000006"]
    assert load_checkpoint(root).global_state["w"].item() == 6.0


# ------------------------------------------------------------------------------------ 2. corrupt weights
SMALL = {
    "data": {"dataset": "mnist", "test_split": "holdout", "num_test": 500, "num_train": 2000},
    "partition": {"method": "dirichlet", "num_clients": 10, "alpha": 0.5},
    "model": {"name": "cnn"},
    "fl": {"strategy": {"name": "fedavg"}, "rounds": 2, "clients_per_round": 5, "num_actors": 1},
}


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_cli_corrupt_init_weights_is_one_line(tmp_path, capsys, damage):
    from gptfl_ray.cli import main
    from gptfl_ray.models import build_model

    cfg = tmp_path / "fl.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    bad = tmp_path / "init.safetensors"
    save_weights(bad, build_model("cnn", 10, (1, 28, 28)).state_dict())
    bad.write_bytes(b"" if damage == "empty" else bad.read_bytes()[:-100])
    assert main(["federate", str(cfg), "--init", str(bad), "--output", str(tmp_path / "run")]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert str(bad) in line and ("empty" if damage == "empty" else "not a readable safetensors") in line
    assert not (tmp_path / "run").exists()  # failed before any work


def test_cli_resume_with_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    from gptfl_ray.cli import main

    cfg = tmp_path / "fl.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    run = tmp_path / "run"
    atomic_write_json(
        run / "run.json", {"seed": 0, "init": "random", "config": dump_config(load_config(cfg))}
    )
    folder = save_checkpoint(run / "checkpoint", ckpt(2))
    (folder / "global.safetensors").write_bytes(b"")  # what a rename without fsync leaves after a power loss
    assert main(["federate", str(cfg), "--resume", str(run)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert str(folder / "global.safetensors") in line and "empty" in line


def test_unreadable_json_names_the_file(tmp_path):
    from gptfl_ray.io import read_json

    (tmp_path / "state.json").write_text('{"round": ')
    with pytest.raises(ValueError, match=r"state\.json: not a readable JSON file"):
        read_json(tmp_path / "state.json")


# ------------------------------------------------------------------------------------ 3. deadlines
def test_task_deadline_defaults_to_a_multiple_of_the_measured_time():
    from gptfl_ray.fl.pool import TaskDeadlines

    d = TaskDeadlines()
    assert d.seconds("train", 100) == 600.0  # nothing measured yet
    for seconds, samples in [(2.0, 100), (4.0, 100), (30.0, 100)]:  # median: 0.04 s per sample
        d.record("train", seconds, samples)
    assert d.seconds("train", 1000) == pytest.approx(400.0)  # 10x the median time per sample x samples
    assert d.seconds("train", 2000) == pytest.approx(800.0)  # a client with 2x the data gets 2x the time
    assert d.seconds("train", 100) == 60.0  # never below the floor (10x the median would be 40 s)
    assert d.seconds("evaluate") == 600.0  # each kind of task is measured on its own
    assert TaskDeadlines(2.5).seconds("train", 1000) == 2.5  # fl.task_timeout_s: a fixed deadline


def test_pool_kills_and_replaces_hung_actors(ray_session):
    from gptfl_ray.config import LocalTrainConfig, StrategyConfig
    from gptfl_ray.fl.client import ClientSpec
    from gptfl_ray.fl.pool import ClientPool, Task, TaskDeadlines

    class StallingClient:
        """A client actor as the pool sees one (built from the spec, answering `info`), with a method that hangs
        forever on request (alive, never answering). Defined here, it travels by value: its 4 processes import
        neither torch nor the test module."""

        def __init__(self, spec):
            self.spec = spec

        def info(self) -> dict:
            return {"pid": os.getpid(), "device": "cpu", "torch_threads": 1}

        def work(self, what: str) -> str:
            while what == "hang":
                time.sleep(3600)
            return what

    spec = ClientSpec("cnn", 10, (1, 28, 28), None, LocalTrainConfig(), StrategyConfig())
    events: list[dict] = []
    pool = ClientPool(
        spec,
        1,
        num_cpus=1,
        num_gpus=0,
        namespace="test-hung",
        max_replacements=2,
        actor_cls=StallingClient,
        on_event=events.append,
        deadlines=TaskDeadlines(2.0),
    )
    try:
        pool.wait_ready()
        # client_retries=0: the hung task is a lost client; the next task runs on the fresh actor
        outs = list(pool.run([Task(0, "work", ("hang",)), Task(1, "work", ("ok",))], retries=0))
        assert [(o.task.key, o.error, o.value) for o in outs] == [
            (0, "actor timed out (TaskTimeoutError)", None),
            (1, None, "ok"),
        ]
        assert [e["event"] for e in events] == ["task_timeout"] and events[0]["seconds"] >= 2.0
        # a hang outside run() (e.g. in a secure-aggregation stage) is found by the ping with a deadline
        pool.actors[0].work.remote("hang")
        assert pool.replace_dead(timeout_s=1.0) == [0] and events[-1]["event"] == "actor_hung"
        assert pool.call_all("work", "ok") == ["ok"]
        with pytest.raises(
            RuntimeError, match=r"3 client actors died or hung \(fl\.max_actor_replacements=2\)"
        ):
            pool.actors[0].work.remote("hang")
            pool.replace_dead(timeout_s=1.0)
    finally:
        pool.shutdown()


def test_secure_aggregation_waits_have_a_default_deadline():
    import inspect

    from gptfl_ray.labels.secagg_ray import secure_sum

    assert inspect.signature(secure_sum).parameters["timeout_s"].default > 0
    cfg = validate_config({})
    assert cfg.fl.secagg_timeout_s > 0 and cfg.labels.secagg_timeout_s > 0 and cfg.fl.task_timeout_s is None
    for section in ("fl", "labels"):
        with pytest.raises(ConfigError, match=rf"{section}\.secagg_timeout_s"):
            validate_config(json.loads(f'{{"{section}": {{"secagg_timeout_s": null}}}}'))
