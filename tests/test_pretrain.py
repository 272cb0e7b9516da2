"""Pretraining: reproducible whatever Ray's scheduling, resumable to the same result, keyed by its inputs."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from gptfl_ray.config import RunConfig, validate_config
from gptfl_ray.io import atomic_write_json, load_weights, read_json

TIMES = {"train_time_s", "samples_per_s"}


# ------------------------------------------------------------------------------------------ helpers
def write_synthetic(out: Path, *, shards: int = 6, rows_per_shard: int = 20, seed: int = 0) -> Path:
    """A finished synthetic folder in `gptfl generate`'s layout: digit-like 28×28 PNGs in several shards."""
    rng = np.random.default_rng(seed)
    (out / "shards").mkdir(parents=True)
    n = shards * rows_per_shard
    labels = rng.integers(0, 10, n)
    names = []
    for k in range(shards):
        rows = np.arange(k * rows_per_shard, (k + 1) * rows_per_shard)
        pngs = []
        for r in rows:
            img = rng.integers(0, 60, (28, 28)).astype(np.uint8)
            y = int(labels[r])
            img[2 + 2 * y : 8 + 2 * y, 4:24] = 255  # a bar whose height encodes the class
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        table = pa.table(
            {
                "row": pa.array(rows, pa.int64()),
                "label": pa.array(labels[rows], pa.int64()),
                "label_name": [str(labels[r]) for r in rows],
                "image": pa.array(pngs, pa.binary()),
            }
        )
        name = f"shards/part-{k:05d}.parquet"
        pq.write_table(table, out / name)
        names.append(name)
    atomic_write_json(
        out / "manifest.json",
        {
            "format": 1,
            "num_rows": n,
            "counts_per_class": np.bincount(labels, minlength=10).tolist(),
            "label_names": [str(i) for i in range(10)],
            "kind": "image",
            "modality": "image",
            "dataset": "mnist",
            "generator": "glyphs",
            "config_hash": "same-config",  # two folders of one config can still hold different samples
            "rows_per_shard": rows_per_shard,
            "shards": names,
            "image_size": 28,
            "channels": 1,
            "complete": True,
        },
    )
    return out


def tiny_cfg(tmp: Path | None = None, **pretrain):
    raw = {
        "data": {"dataset": "mnist"},
        "model": {"name": "convnet", "width": 4},
        "pretrain": {"epochs": 3, "batch_size": 16, "val_fraction": 0.2, **pretrain},
    }
    if tmp is not None:
        raw["output_dir"] = str(tmp)
    return validate_config(raw)


def interrupt_after(monkeypatch, epoch: int) -> None:
    """Make the next pretraining fail right after epoch ``epoch``'s checkpoint is registered, as if killed then.

    The Train controller raises while handling that report, so later epochs the worker may already have run
    are never registered: a rerun resumes from epoch ``epoch + 1``."""
    import ray.train

    import gptfl_ray.pretrain as pretrain_mod

    class Stop(ray.train.UserCallback):  # defined here: pickled by value into the Train controller
        def after_report(self, run_context, metrics, checkpoint):
            if metrics[0]["epoch"] == epoch:
                raise RuntimeError(f"interrupted after epoch {epoch}")

    real_fit = pretrain_mod.fit

    def fit_then_stop(*args, **kwargs):
        monkeypatch.setattr(pretrain_mod, "fit", real_fit)  # the next call runs normally
        return real_fit(*args, **kwargs, callbacks=[Stop()])

    monkeypatch.setattr(pretrain_mod, "fit", fit_then_stop)


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMES} for h in history]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_weights(a / "weights.safetensors"), load_weights(b / "weights.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("syn") / "a")


@dataclass(frozen=True)
class TwoRuns:
    """One synthetic set, config (2 workers) and seed pretrained twice: by `pretrain()`, interrupted after epoch 0
    and rerun in the same folder, and by `gptfl pretrain` without interruption."""

    cfg: RunConfig
    cfg_file: Path  # the command's config file
    interrupted: str  # the interrupted `pretrain()`'s error ("" if it did not fail)
    weights_after_interrupt: bool  # whether the interrupted attempt left weights.safetensors
    direct: Path  # pretrain()'s folder
    direct_metrics: dict  # the rerun's: resumed from the interrupted attempt's checkpoint
    command: Path  # the command's default folder, read from its "weights: " line
    command_metrics: dict


@pytest.fixture(scope="module")
def two_runs(ray_session, synthetic, tmp_path_factory) -> TwoRuns:
    """6 shards read by 2 CPUs: the order in which blocks come out of Ray Data varies from run to run. Two workers
    (the session's 2 CPUs): their path is the more demanding one, and 1-worker pretraining runs in every
    end-to-end test (test_run compares a killed and resumed one with an uninterrupted one)."""
    from gptfl_ray.cli import main
    from gptfl_ray.pretrain import pretrain

    root = tmp_path_factory.mktemp("runs")
    cfg = tiny_cfg(root / "out", num_workers=2, cpus_per_worker=1)
    direct = root / "r0"
    interrupted = ""
    with pytest.MonkeyPatch.context() as mp:
        interrupt_after(mp, epoch=0)
        try:
            pretrain(cfg, synthetic, direct, seed=cfg.seeds[0])
        except Exception as err:  # Ray wraps the callback's error: its message is checked by the test
            interrupted = str(err)
    weights_after_interrupt = (direct / "weights.safetensors").exists()
    direct_metrics = pretrain(cfg, synthetic, direct, seed=cfg.seeds[0])
    cfg_file = root / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["pretrain", str(cfg_file), "--synthetic", str(synthetic)]) == 0, stdout.getvalue()
    (line,) = [x for x in stdout.getvalue().splitlines() if x.startswith("weights: ")]
    command = Path(line.removeprefix("weights: ")).parent
    return TwoRuns(
        cfg,
        cfg_file,
        interrupted,
        weights_after_interrupt,
        direct,
        direct_metrics,
        command,
        read_json(command / "metrics.json"),
    )


# ------------------------------------------------------------------------------------------ data order
def test_split_and_epoch_order_are_seeded_functions_of_the_row_ids():
    from gptfl_ray.pretrain import shuffled_batches, split_rows

    rows = np.arange(1000, 1100)
    train, val = split_rows(rows[::-1], 0.1, seed=5)  # input order does not matter
    assert len(val) == 10 and sorted([*train, *val]) == rows.tolist()
    assert np.array_equal(val, split_rows(rows, 0.1, seed=5)[1])
    assert not np.array_equal(val, split_rows(rows, 0.1, seed=6)[1])

    def epoch(order, chunk, *, batch_size=8, seed_epoch=0, **kw):
        chunks = [{"row": order[i : i + chunk], "x": order[i : i + chunk] * 2} for i in range(0, 100, chunk)]
        batches = list(shuffled_batches(chunks, seed=1, epoch=seed_epoch, batch_size=batch_size, **kw))
        assert all(np.array_equal(b["x"], b["row"] * 2) for b in batches)  # columns stay aligned
        return [b["row"].tolist() for b in batches]

    # Fits the buffer: one seeded permutation, whatever the chunking and the order rows arrive in.
    ref = epoch(rows, 7)
    assert epoch(rows[::-1].copy(), 30) == ref and sorted(np.concatenate(ref).tolist()) == rows.tolist()
    assert [len(b) for b in ref] == [8] * 12 + [4]
    assert epoch(rows, 7, seed_epoch=1) != ref
    # A buffer smaller than the epoch: still every row once, and the same for the same stream.
    small = epoch(rows, 10, buffer_rows=20)
    assert (
        small == epoch(rows, 10, buffer_rows=20) and sorted(np.concatenate(small).tolist()) == rows.tolist()
    )
    # Two workers: contiguous halves of each global batch of 16; a last global batch smaller than 2 is dropped.
    r0, r1 = (epoch(rows, 7, world_size=2, rank=r) for r in (0, 1))
    assert [len(b) for b in r0] == [len(b) for b in r1] == [8] * 6 + [2]
    merged = [a + b for a, b in zip(r0, r1, strict=True)]
    assert merged == epoch(rows, 7, batch_size=16)[:7]  # the one-worker stream of 16-row batches, split


@pytest.mark.slow  # the module's 3 Ray Train fits, 2 workers each: ~30 s each on 2 cores
def test_interrupted_pretraining_resumes_from_its_last_checkpoint(two_runs):
    assert "interrupted after epoch 0" in two_runs.interrupted, two_runs.interrupted
    assert not two_runs.weights_after_interrupt
    assert two_runs.direct_metrics["resumed_from_epoch"] == 1


@pytest.mark.slow  # the module's 3 Ray Train fits, 2 workers each: ~30 s each on 2 cores
def test_two_workers_resumed_or_not_give_identical_weights(two_runs):
    """Identical for the same worker count whatever Ray's scheduling, and a resumed run reaches the uninterrupted
    result: all 3 epochs, same numbers."""
    assert same_weights(two_runs.direct, two_runs.command)
    assert without_times(two_runs.command_metrics["history"]) == without_times(
        two_runs.direct_metrics["history"]
    )


@pytest.mark.slow  # the module's 3 Ray Train fits, 2 workers each: ~30 s each on 2 cores
def test_metrics_history_holds_every_epoch(two_runs):
    metrics = two_runs.direct_metrics  # epoch 0 from before the interruption, 1 and 2 from the rerun
    assert [h["epoch"] for h in metrics["history"]] == [0, 1, 2]  # not only the 2 kept checkpoints
    # the workers' shares cover every row once
    assert all(h["train_samples"] == metrics["num_train"] == 96 for h in metrics["history"])
    assert all(0.0 <= h["val_accuracy"] <= 1.0 for h in metrics["history"])


def test_checkpoint_holding_a_pickled_object_is_refused(tmp_path):
    """Checkpoints load with torch.load(weights_only=True): a pickled arbitrary object is not executed."""
    from gptfl_ray.errors import InputError
    from gptfl_ray.pretrain import load_state

    state = {"model": {"w": torch.zeros(2)}, "epoch": 0, "scheduler": None}
    torch.save(state, tmp_path / "ok.pt")
    assert load_state(tmp_path / "ok.pt")["epoch"] == 0
    torch.save({**state, "payload": Path("/tmp/anything")}, tmp_path / "state.pt")  # not a weights-only type
    with pytest.raises(
        InputError, match=r"state\.pt: refusing a checkpoint that holds arbitrary Python objects"
    ):
        load_state(tmp_path / "state.pt")


# ------------------------------------------------------------------------------------------ cache key
@pytest.mark.slow  # the module's 3 Ray Train fits, 2 workers each: ~30 s each on 2 cores
def test_pretrain_command_keys_its_cache_by_the_synthetic_set(two_runs, synthetic, tmp_path, capsys):
    """Without --output, the command writes to a folder named by the key of its inputs, so a second synthetic
    set gets its own folder; an explicit folder of another set is refused."""
    from gptfl_ray.cli import main
    from gptfl_ray.data.synthetic import synthetic_identity
    from gptfl_ray.pretrain import pretrain_key

    cfg, folder_a = two_runs.cfg, two_runs.command
    key = pretrain_key(cfg, synthetic_identity(synthetic), cfg.seeds[0])
    assert (folder_a / "weights.safetensors").is_file()
    assert folder_a.name == f"pretrain-{key}" and two_runs.command_metrics["key"] == key
    other = write_synthetic(tmp_path / "b", seed=1)  # same manifest config hash, other samples
    # The other set's default folder is another one (checked without a second training: the key differs) ...
    assert pretrain_key(cfg, synthetic_identity(other), cfg.seeds[0]) not in folder_a.name
    # ... and the first set's folder is never reused for it, named explicitly or not.
    assert (
        main(["pretrain", str(two_runs.cfg_file), "--synthetic", str(other), "--output", str(folder_a)]) == 2
    )
    err = capsys.readouterr().err
    assert "holds pretraining of other inputs" in err and len(err.strip().splitlines()) == 1
