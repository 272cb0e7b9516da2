"""Free Spoken Digit Dataset: ``recordings/{digit}_{speaker}_{index}.wav``; index 0-4 is the official test set."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gptfl_ray.config import AudioConfig, DataConfig
from gptfl_ray.data.base import DIGIT_WORDS, ArrayDataset, DatasetSpec, Splits, register
from gptfl_ray.errors import InputError
from gptfl_ray.paths import DataNotFoundError

NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


def load_fsdd(root: Path, audio: AudioConfig) -> Splits:
    rec = root / "recordings"
    files = sorted(rec.glob("*.wav")) if rec.is_dir() else []
    if not files:
        raise DataNotFoundError(
            f"FSDD missing: put the WAV files as {rec}/<digit>_<speaker>_<index>.wav ({SPEC.download_hint})"
        )
    parsed = []
    for f in files:
        m = NAME.match(f.name)
        if m is None:
            raise InputError(f"{f}: not an FSDD file name (<digit>_<speaker>_<index>.wav)")
        parsed.append((f, int(m.group(1)), m.group(2), int(m.group(3))))
    from gptfl_ray.data.audio import load_clips

    speakers = sorted({p[2] for p in parsed})
    spk_id = {s: i for i, s in enumerate(speakers)}
    x = load_clips([p[0] for p in parsed], audio)
    y = np.array([p[1] for p in parsed], dtype=np.int64)
    groups = np.array([spk_id[p[2]] for p in parsed], dtype=np.int64)
    is_test = np.array([p[3] <= 4 for p in parsed])
    full = ArrayDataset(
        x=x,
        y=y,
        label_names=list(SPEC.label_names),
        modality="audio",
        sample_rate=audio.sample_rate,
        groups=groups,
        group_names=speakers,
    )
    return Splits(train=full.subset(np.flatnonzero(~is_test)), test=full.subset(np.flatnonzero(is_test)))


def load(cfg: DataConfig, root: Path) -> Splits:
    return load_fsdd(root, cfg.audio)


SPEC = register(
    DatasetSpec(
        name="fsdd",
        modality="audio",
        num_classes=10,
        label_names=tuple(str(i) for i in range(10)),
        label_text={str(i): w for i, w in enumerate(DIGIT_WORDS)},
        download_hint="git clone https://github.com/Jakobovski/free-spoken-digit-dataset (where a network exists)",
        natural_groups=True,  # speaker
        test_split="official: recordings with index 0-4",
        loader=load,
    )
)
