"""Free Spoken Digit Dataset: ``recordings/{digit}_{speaker}_{index}.wav``; index 0-4 is the official test set."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gptfl_ray.config import AudioConfig
from gptfl_ray.data.audio import load_clips
from gptfl_ray.data.base import ArrayDataset, Splits, get_spec
from gptfl_ray.errors import InputError
from gptfl_ray.paths import DataNotFoundError

NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


def load_fsdd(root: Path, audio: AudioConfig) -> Splits:
    rec = root / "recordings"
    files = sorted(rec.glob("*.wav")) if rec.is_dir() else []
    if not files:
        raise DataNotFoundError(
            f"FSDD missing: put the WAV files as {rec}/<digit>_<speaker>_<index>.wav "
            f"({get_spec('fsdd').download_hint})"
        )
    parsed = []
    for f in files:
        m = NAME.match(f.name)
        if m is None:
            raise InputError(f"{f}: not an FSDD file name (<digit>_<speaker>_<index>.wav)")
        parsed.append((f, int(m.group(1)), m.group(2), int(m.group(3))))
    speakers = sorted({p[2] for p in parsed})
    spk_id = {s: i for i, s in enumerate(speakers)}
    x = load_clips([p[0] for p in parsed], audio)
    y = np.array([p[1] for p in parsed], dtype=np.int64)
    groups = np.array([spk_id[p[2]] for p in parsed], dtype=np.int64)
    is_test = np.array([p[3] <= 4 for p in parsed])
    full = ArrayDataset(
        x=x,
        y=y,
        label_names=list(get_spec("fsdd").label_names),
        modality="audio",
        sample_rate=audio.sample_rate,
        groups=groups,
        group_names=speakers,
    )
    return Splits(train=full.subset(np.flatnonzero(~is_test)), test=full.subset(np.flatnonzero(is_test)))
