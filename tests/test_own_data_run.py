"""`gptfl run` end to end on data a user brings (1 FL round, tiny models), once per modality: an audio folder
with speaker ids as the natural clients, and a ``module:function`` image dataset with a ``module:callable`` model
from a module that neither the FL actors nor the Ray Train workers can import. Label names come from the data,
and the prompts, synthetic set, pretraining, FL and report all follow from them. The other layouts (image folder,
Hugging Face on disk / Parquet) differ only in their loader, which returns the same ``Splits`` and spec the rest
of a run reads: their loaders and bad layouts are tested in test_own_data.py, without Ray."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import soundfile as sf

from gptfl_ray.config import validate_config
from gptfl_ray.io import read_json, read_jsonl

pytestmark = pytest.mark.slow

AUDIO = {"sample_rate": 16000, "clip_seconds": 0.5, "n_mels": 20}


def _tone(freq: float, rng: np.random.Generator, sr: int = 16000, seconds: float = 0.4) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.4 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _run(
    tmp_path,
    name: str,
    data: dict,
    *,
    audio: bool,
    partition: dict | None = None,
    model=None,
    clients: int = 2,
):
    """Runs `gptfl run` (the GPT-FL arm, 1 round) and returns (run folder, arms, synthetic manifest)."""
    from gptfl_ray.run import run

    generate = (
        {"generator": "espeak", "batch_size": 6, "concurrency": 1, "rows_per_shard": 6}
        if audio
        else {"generator": "glyphs", "batch_size": 6, "concurrency": 1, "rows_per_shard": 6}
    )
    cfg = validate_config(
        {
            "name": name,
            "data": data,
            "partition": partition or {"method": "iid", "num_clients": 2},
            "model": model or ({"name": "audio_cnn"} if audio else {"name": "convnet", "width": 4}),
            "labels": {"source": "dataset"},
            "prompts": {"num_per_class": 2},
            "generate": generate,
            "pretrain": {"epochs": 1, "batch_size": 4, "val_fraction": 0.25},
            "fl": {
                "rounds": 1,
                "clients_per_round": clients,
                "local": {"epochs": 1, "batch_size": 4},
                "num_actors": 1,
            },
            "baselines": [],
        },
        name,
    )
    run_dir = tmp_path / "run"
    out = run(cfg, run_dir)
    (synthetic,) = run_dir.glob("synthetic-*")
    manifest = read_json(synthetic / "manifest.json")
    arms = out["results"]["arms"]
    assert set(arms) == {"gptfl"}
    for arm in arms.values():
        rounds = [
            r
            for r in read_jsonl(run_dir / arm["0"]["dir"] / "metrics.jsonl")
            if r.get("accuracy") is not None
        ]
        assert [r["round"] for r in rounds] == [1] and 0.0 <= rounds[0]["accuracy"] <= 1.0
        assert rounds[0]["num_updates"] == clients
    assert "| gptfl |" in (run_dir / "report.md").read_text()
    return run_dir, arms, manifest


def test_gptfl_run_on_an_audio_folder_with_speakers_as_clients(tmp_path, ray_session):
    rng = np.random.default_rng(0)
    root = tmp_path / "sounds"
    for c, word in enumerate(["no", "yes"]):
        for speaker in ["alice", "bob", "carol"]:
            for i in range(3):
                path = root / word / f"{speaker}_{i}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, _tone(300 + 200 * c + 10 * i, rng), 16000)
    data = {
        "dataset": "audiofolder",
        "root": str(root),
        "group_regex": r"^([a-z]+)_\d+",
        "test_split": "holdout",
        "num_test": 4,
        "audio": AUDIO,
    }
    # the natural partition: one client per speaker found in the file names, all three sampled
    _, _, manifest = _run(tmp_path, "own-audio", data, audio=True, partition={"method": "natural"}, clients=3)
    assert manifest["label_names"] == ["no", "yes"] and manifest["counts_per_class"] == [2, 2]


PLUGIN = """
import math

import numpy as np
from torch import nn

from gptfl_ray.data.base import ArrayDataset, Splits


def load():
    rng = np.random.default_rng(0)
    names = ["circle", "square"]

    def part(n):
        y = np.arange(n) % 2
        x = (rng.random((n, 10, 10)) * 80 + 120 * y[:, None, None]).astype(np.uint8)
        return ArrayDataset(x=x, y=y, label_names=names, modality="image")

    return Splits(train=part(16), test=part(6))


def build(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
"""


def test_gptfl_run_on_a_plugin_dataset_and_model_the_workers_cannot_import(
    tmp_path, monkeypatch, ray_session
):
    name = f"own_plugin_{uuid.uuid4().hex[:10]}"
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{name}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(folder))

    def importable(module: str) -> bool:
        import importlib.util

        return importlib.util.find_spec(module) is not None

    assert not ray_session.get(ray_session.remote(importable).remote(name))
    data = {"dataset": f"{name}:load"}
    run_dir, arms, manifest = _run(tmp_path, "own-plugin", data, audio=False, model={"name": f"{name}:build"})
    assert manifest["label_names"] == ["circle", "square"] and manifest["image_size"] == 10
    from gptfl_ray.io import load_weights

    final = load_weights(run_dir / arms["gptfl"]["0"]["dir"] / "final.safetensors")
    assert {k: tuple(v.shape) for k, v in final.items()} == {"1.weight": (2, 100), "1.bias": (2,)}
