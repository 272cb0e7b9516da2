"""``data.dataset: textfile``: the user's texts with labels, as CSV (a header row) or JSON Lines (one object per
line). ``data.root`` is one ``.csv``/``.jsonl`` file (a test set is held out) or a folder with ``train.csv|jsonl``
and ``test.csv|jsonl`` (the official split). ``data.text_column`` (default ``text``) holds the text,
``data.label_column`` (default ``label``) the label and ``data.group_column`` (optional) natural client ids (e.g.
a speaker or an author) for ``partition.method: natural``. Label names are the training split's sorted unique
labels (numbers sort as numbers); texts are tokenized by ``data.text`` (gptfl_ray/data/text.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_ray.config import DataConfig
from gptfl_ray.data.base import ArrayDataset, DatasetSpec, Splits, register
from gptfl_ray.data.own import index
from gptfl_ray.errors import InputError, InputNotFoundError

EXTS = (".csv", ".jsonl")
csv.field_size_limit(1 << 24)  # long texts: the default limit is 128 KiB per field


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The records of a CSV (header row) or JSON Lines file; one-line errors naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror or err})") from None
    if path.suffix.lower() == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}: line {i}: not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}: line {i}: not a JSON object")
            row["_line"] = i
            rows.append(row)
    else:
        reader = csv.DictReader(text.splitlines(), strict=True)
        rows = []
        try:
            for row in reader:
                if None in row:  # more fields than the header has
                    raise InputError(f"{path}: line {reader.line_num}: more fields than the header's")
                row["_line"] = reader.line_num
                rows.append(row)
        except csv.Error as err:
            raise InputError(f"{path}: line {reader.line_num}: {err}") from None
    if not rows:
        raise InputError(f"{path}: no records")
    return rows


def column(rows: list[dict[str, Any]], name: str, field: str, path: Path) -> list[Any]:
    """Every record's value of ``name``; a missing column or value is an error naming ``field`` and the line."""
    if name not in rows[0]:
        shown = ", ".join(k for k in rows[0] if k != "_line")
        raise InputError(f"{path}: no column {name!r} ({field}; columns: {shown})")
    out = []
    for r in rows:
        v = r.get(name)
        if v is None:
            raise InputError(f"{path}: line {r['_line']}: no value in column {name!r} ({field})")
        out.append(v)
    return out


def texts_of(rows: list[dict[str, Any]], name: str, field: str, path: Path) -> np.ndarray:
    values = column(rows, name, field, path)
    for r, v in zip(rows, values, strict=True):
        if not isinstance(v, str):
            raise InputError(
                f"{path}: line {r['_line']}: column {name!r} is not text (got {type(v).__name__})"
            )
    return np.array(values, dtype=object)


def _label_values(values: list[Any]) -> list[Any]:
    """Labels as given when all are integers (sorted numerically), else as strings."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return values
    return [str(v) for v in values]


def _files(root: Path) -> dict[str, Path]:
    if root.is_file():
        if root.suffix.lower() not in EXTS:
            raise InputError(f"{root}: not a .csv or .jsonl file (data.root)")
        return {"all": root}
    if not root.is_dir():
        raise InputNotFoundError(f"{root}: text file or folder not found (data.root)")
    found = {}
    for split in ("train", "test"):
        hits = [root / f"{split}{e}" for e in EXTS if (root / f"{split}{e}").is_file()]
        if len(hits) > 1:
            raise InputError(f"{root}: both {hits[0].name} and {hits[1].name}: keep one")
        if hits:
            found[split] = hits[0]
    if set(found) != {"train", "test"}:
        raise InputError(
            f"{root}: expected train.csv|jsonl and test.csv|jsonl in the folder (or data.root: one .csv/.jsonl file)"
        )
    return found


def load(cfg: DataConfig, root: Path) -> Splits | ArrayDataset:
    text_col, label_col = cfg.text_column or "text", cfg.label_column or "label"
    paths = _files(root)
    rows = {split: read_rows(path) for split, path in paths.items()}
    first = "train" if "train" in rows else "all"
    labels = {s: _label_values(column(r, label_col, "data.label_column", paths[s])) for s, r in rows.items()}
    names = sorted(set(labels[first]))
    group_names = None
    if cfg.group_column:
        groups = {
            s: [str(g) for g in column(r, cfg.group_column, "data.group_column", paths[s])]
            for s, r in rows.items()
        }
        group_names = sorted({g for gs in groups.values() for g in gs})
    parts = {}
    for split, r in rows.items():
        y, _ = index(labels[split], names, f"{paths[split]} column {label_col!r}")
        parts[split] = ArrayDataset(
            x=texts_of(r, text_col, "data.text_column", paths[split]),
            y=y,
            label_names=[str(n) for n in names],
            modality="text",
            groups=None if group_names is None else index(groups[split], group_names)[0],
            group_names=group_names,
            text=cfg.text,
        )
    return Splits(train=parts["train"], test=parts["test"]) if "test" in parts else parts["all"]


def check(cfg: DataConfig) -> str | None:
    return (
        None
        if cfg.root
        else "data.root: the .csv/.jsonl file (or folder) is required with data.dataset 'textfile'"
    )


SPEC = register(
    DatasetSpec(
        name="textfile",
        modality="text",
        num_classes=0,
        label_names=(),  # the training split's sorted unique labels
        natural_groups=True,  # with data.group_column
        test_split="official when data.root is a folder with train.* and test.*, else held out",
        loader=load,
        from_data=True,
        options=("text_column", "label_column", "group_column", "text"),
        check=check,
    )
)
