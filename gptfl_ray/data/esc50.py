"""ESC-50 environmental sounds: ``audio/*.wav`` + ``meta/esc50.csv`` (filename, fold, target, category, …).

The dataset is distributed for 5-fold cross-validation; fold 5 is used as the held-out test set.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from gptfl_ray.config import AudioConfig, DataConfig
from gptfl_ray.data.base import ArrayDataset, DatasetSpec, Splits, register
from gptfl_ray.errors import InputError
from gptfl_ray.paths import DataNotFoundError

TEST_FOLD = 5


def load_esc50(root: Path, audio: AudioConfig) -> Splits:
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise DataNotFoundError(
            f"ESC-50 missing: put meta/esc50.csv and audio/*.wav under {root}/ ({SPEC.download_hint})"
        )
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ("filename", "fold", "target", "category") if rows and c not in rows[0]]
    if missing or not rows:
        raise InputError(f"{meta}: expected columns filename, fold, target, category")
    names: dict[int, str] = {int(r["target"]): r["category"].replace("_", " ") for r in rows}
    label_names = [names[i] for i in sorted(names)]
    from gptfl_ray.data.audio import load_clips

    x = load_clips([root / "audio" / r["filename"] for r in rows], audio)
    full = ArrayDataset(
        x=x,
        y=np.array([int(r["target"]) for r in rows], dtype=np.int64),
        label_names=label_names,
        modality="audio",
        sample_rate=audio.sample_rate,
    )
    is_test = np.array([int(r["fold"]) == TEST_FOLD for r in rows])
    return Splits(train=full.subset(np.flatnonzero(~is_test)), test=full.subset(np.flatnonzero(is_test)))


def load(cfg: DataConfig, root: Path) -> Splits:
    return load_esc50(root, cfg.audio)


SPEC = register(
    DatasetSpec(
        name="esc50",
        modality="audio",
        num_classes=50,
        label_names=(),  # read from meta/esc50.csv
        download_hint="https://github.com/karolpiczak/ESC-50 (where a network exists)",
        test_split=f"official: fold {TEST_FOLD}",
        loader=load,
    )
)
