"""MELD (Poria et al., ACL 2019): utterances of the TV series *Friends*, each labelled with one of 7 emotions and
one of 3 sentiments, in the authors' released CSV layout (github.com/declare-lab/MELD, ``data/MELD/``):
``train_sent_emo.csv`` (the federated pool), ``test_sent_emo.csv`` (the official test split) and
``dev_sent_emo.csv`` (not used: nothing here is tuned on a validation split), with the columns ``Utterance``,
``Speaker``, ``Emotion``, ``Sentiment``, ``Dialogue_ID``, ... ``data.label_column``: ``emotion`` (7 classes, the
default) or ``sentiment`` (3). The speaker is each utterance's natural client id (``partition.method: natural``;
one id space over both splits, as test speakers may be unseen in training). The usual metric is weighted F1.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from gptfl_ray.config import DataConfig
from gptfl_ray.data.base import ArrayDataset, DatasetSpec, Splits, register
from gptfl_ray.data.textfile import column, read_rows, texts_of
from gptfl_ray.errors import InputError
from gptfl_ray.paths import DataNotFoundError

LABELS = {
    "emotion": ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"),
    "sentiment": ("negative", "neutral", "positive"),
}
FILES = {"train": "train_sent_emo.csv", "test": "test_sent_emo.csv"}
HINT = "github.com/declare-lab/MELD, data/MELD/*_sent_emo.csv"


def label_kind(cfg: DataConfig) -> str:
    return (cfg.label_column or "emotion").lower()


def _read(path: Path, kind: str) -> tuple[ArrayDataset, list[str]]:
    rows = read_rows(path)
    names = LABELS[kind]
    values = [str(v).strip().lower() for v in column(rows, kind.capitalize(), "data.label_column", path)]
    pos = {n: i for i, n in enumerate(names)}
    for r, v in zip(rows, values, strict=True):
        if v not in pos:
            raise InputError(f"{path}: line {r['_line']}: {kind} {v!r} is not one of {', '.join(names)}")
    spk = [str(s) for s in column(rows, "Speaker", "the speaker", path)]
    ds = ArrayDataset(
        x=texts_of(rows, "Utterance", "the utterance", path),
        y=np.array([pos[v] for v in values], dtype=np.int64),
        label_names=list(names),
        modality="text",
    )
    return ds, spk


def load(cfg: DataConfig, root: Path) -> Splits:
    paths = {split: root / name for split, name in FILES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise DataNotFoundError(f"MELD missing: put {' and '.join(missing)} in {root} ({HINT})")
    kind = label_kind(cfg)
    parts = {split: _read(path, kind) for split, path in paths.items()}
    speakers = sorted({s for _, spk in parts.values() for s in spk})
    ids = {s: i for i, s in enumerate(speakers)}
    for ds, spk in parts.values():
        ds.groups = np.array([ids[s] for s in spk], dtype=np.int64)
        ds.group_names = speakers
        ds.text = cfg.text
    return Splits(train=parts["train"][0], test=parts["test"][0])


def configured(cfg: DataConfig) -> DatasetSpec:
    """The spec with the label names of ``data.label_column`` (known without reading the files)."""
    names = LABELS.get(label_kind(cfg), LABELS["emotion"])
    return replace(SPEC, label_names=names, num_classes=len(names))


def check(cfg: DataConfig) -> str | None:
    if label_kind(cfg) not in LABELS:
        return f"data.label_column: MELD's labels are 'emotion' (7 classes) or 'sentiment' (3), not {cfg.label_column!r}"
    return None


SPEC = register(
    DatasetSpec(
        name="meld",
        modality="text",
        num_classes=len(LABELS["emotion"]),
        label_names=LABELS["emotion"],  # or the sentiments, with data.label_column: get_spec(data_cfg)
        download_hint=HINT,
        natural_groups=True,  # speaker
        test_split="official: test_sent_emo.csv",
        loader=load,
        options=("label_column", "text"),
        check=check,
        configured=configured,
    )
)
