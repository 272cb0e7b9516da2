"""ESC-50 environmental sounds: ``audio/*.wav`` + ``meta/esc50.csv`` (filename, fold, target, category, …).

The dataset is distributed for 5-fold cross-validation; fold 5 is used as the held-out test set.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from gptfl_ray.config import AudioConfig
from gptfl_ray.data.audio import load_clips
from gptfl_ray.data.base import ArrayDataset, Splits, get_spec
from gptfl_ray.errors import InputError
from gptfl_ray.paths import DataNotFoundError

TEST_FOLD = 5


def load_esc50(root: Path, audio: AudioConfig) -> Splits:
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise DataNotFoundError(
            f"ESC-50 missing: put meta/esc50.csv and audio/*.wav under {root}/ "
            f"({get_spec('esc50').download_hint})"
        )
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ("filename", "fold", "target", "category") if rows and c not in rows[0]]
    if missing or not rows:
        raise InputError(f"{meta}: expected columns filename, fold, target, category")
    names: dict[int, str] = {int(r["target"]): r["category"].replace("_", " ") for r in rows}
    label_names = [names[i] for i in sorted(names)]
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
