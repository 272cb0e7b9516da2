"""``data.dataset: audiofolder``: the user's clips, ``<root>/<class>/*.wav`` (a test set is held out) or
``<root>/train/<class>/*.wav`` + ``<root>/test/<class>/*.wav``. Label names are the folder names. With
``data.group_regex``, the regex's first group in each file name is its speaker/group id (natural partitioning).
Clips are standardised like every real dataset's (``data.audio``)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gptfl_ray.config import DataConfig
from gptfl_ray.data.base import ArrayDataset, DatasetSpec, Splits, register
from gptfl_ray.data.own import class_folders, index, splits_or_pool
from gptfl_ray.errors import InputError

EXTS = (".wav", ".flac")


def load(cfg: DataConfig, root: Path) -> Splits | ArrayDataset:
    from gptfl_ray.data.audio import load_clips

    scanned = class_folders(root, EXTS, "audio")
    first = "train" if "train" in scanned else "all"
    names = sorted({c for _, c in scanned[first]})
    pattern = re.compile(cfg.group_regex) if cfg.group_regex else None
    group_of: dict[str, str] = {}
    if pattern is not None:
        for files in scanned.values():
            for f, _ in files:
                m = pattern.search(f.name)
                if m is None or m.group(1) is None:
                    raise InputError(f"{f}: file name does not match data.group_regex {cfg.group_regex!r}")
                group_of[str(f)] = m.group(1)
    group_names = sorted(set(group_of.values())) if pattern is not None else None
    parts = {}
    for split, files in scanned.items():
        y, _ = index([c for _, c in files], names, str(root / split))
        groups = None
        if group_names is not None:
            groups = np.array([group_names.index(group_of[str(f)]) for f, _ in files], dtype=np.int64)
        parts[split] = ArrayDataset(
            x=load_clips([f for f, _ in files], cfg.audio),
            y=y,
            label_names=names,
            modality="audio",
            sample_rate=cfg.audio.sample_rate,
            groups=groups,
            group_names=group_names,
        )
    return splits_or_pool(parts)


def check(cfg: DataConfig) -> str | None:
    return None if cfg.root else "data.root: the audio folder is required with data.dataset 'audiofolder'"


SPEC = register(
    DatasetSpec(
        name="audiofolder",
        modality="audio",
        num_classes=0,
        label_names=(),  # the class folder names
        natural_groups=True,  # with data.group_regex
        test_split="official when <root>/train and <root>/test exist, else held out",
        loader=load,
        from_data=True,
        options=("group_regex",),
        check=check,
    )
)
