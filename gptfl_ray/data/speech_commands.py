"""Google Speech Commands in its standard layout: ``<word>/<speaker>_nohash_<n>.wav``.

Official split: ``testing_list.txt`` / ``validation_list.txt`` (paths relative to the root); everything
else is training. ``_background_noise_`` is not a class.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gptfl_ray.config import AudioConfig, DataConfig
from gptfl_ray.data.base import ArrayDataset, DatasetSpec, Splits, register
from gptfl_ray.errors import InputError
from gptfl_ray.paths import DataNotFoundError

NAME = re.compile(r"^([0-9a-fA-F]+)_nohash_(\d+)\.wav$")


def scan_speech_commands(root: Path) -> list[tuple[str, str, str]]:
    """(relative path, word, speaker id) for every clip, sorted."""
    if not root.is_dir():
        raise DataNotFoundError(
            f"Speech Commands missing: put <word>/<speaker>_nohash_<n>.wav under {root}/ "
            f"({SPEC.download_hint})"
        )
    out = []
    for f in sorted(root.glob("*/*.wav")):
        word = f.parent.name
        if word.startswith("_"):
            continue
        m = NAME.match(f.name)
        if m is None:
            raise InputError(f"{f}: not a Speech Commands file name (<speaker>_nohash_<n>.wav)")
        out.append((f"{word}/{f.name}", word, m.group(1).lower()))
    if not out:
        raise DataNotFoundError(f"Speech Commands: no <word>/*.wav files under {root}/")
    return out


def load_speech_commands(root: Path, audio: AudioConfig) -> Splits:
    clips = scan_speech_commands(root)
    words = sorted({c[1] for c in clips})
    speakers = sorted({c[2] for c in clips})
    wid = {w: i for i, w in enumerate(words)}
    sid = {s: i for i, s in enumerate(speakers)}
    test_list = root / "testing_list.txt"
    test = set(test_list.read_text().split()) if test_list.is_file() else set()
    from gptfl_ray.data.audio import load_clips

    x = load_clips([root / c[0] for c in clips], audio)
    full = ArrayDataset(
        x=x,
        y=np.array([wid[c[1]] for c in clips], dtype=np.int64),
        label_names=words,
        modality="audio",
        sample_rate=audio.sample_rate,
        groups=np.array([sid[c[2]] for c in clips], dtype=np.int64),
        group_names=speakers,
    )
    is_test = np.array([c[0] in test for c in clips])
    return Splits(train=full.subset(np.flatnonzero(~is_test)), test=full.subset(np.flatnonzero(is_test)))


def load(cfg: DataConfig, root: Path) -> Splits | ArrayDataset:
    """The official split when ``testing_list.txt`` is there, else everything (a test set is held out)."""
    splits = load_speech_commands(root, cfg.audio)
    return splits if len(splits.test) else splits.train


SPEC = register(
    DatasetSpec(
        name="speech_commands",
        modality="audio",
        num_classes=35,
        label_names=(),  # read from the folder layout
        download_hint="torchvision-style download: http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
        natural_groups=True,  # speaker
        test_split="official: testing_list.txt",
        loader=load,
    )
)
