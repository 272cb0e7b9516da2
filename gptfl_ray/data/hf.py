"""``data.dataset: hf``: a Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (a ``Dataset`` or a
``DatasetDict``; ``data.hf.split`` is the federated pool and a ``test`` split, if any, the official test set) or
stored as Parquet/Arrow files (one split: a test set is held out). ``data.hf`` names the image or audio column,
the label column (``ClassLabel`` names, else the sorted unique values) and optionally a group column (natural
client ids). ``datasets`` is imported only here, when such data is read."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_ray.config import DataConfig, HFDataConfig
from gptfl_ray.data.base import ArrayDataset, DatasetSpec, Splits, register
from gptfl_ray.data.own import image_array, index
from gptfl_ray.errors import ConfigError, InputError, InputNotFoundError

FILE_EXTS = (".parquet", ".arrow")


def _open(path: Path, split: str) -> tuple[Any, Any | None]:
    """(the pool split, the test split or None)."""
    import datasets
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    if not path.exists():
        raise InputNotFoundError(f"{path}: Hugging Face dataset not found (data.hf.path)")
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        try:
            data = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: cannot load the saved dataset ({err})") from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ConfigError(f"data.hf.split: no split {split!r} in {path} (splits: {', '.join(data)})")
            return data[split], data["test"] if "test" in data and split != "test" else None
        return data, None
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.suffix in FILE_EXTS)
    if not files or any(f.suffix not in FILE_EXTS for f in files):
        raise InputError(f"{path}: not a save_to_disk folder and no .parquet/.arrow files")
    parts = []
    for f in files:
        try:
            if f.suffix == ".parquet":
                parts.append(datasets.Dataset(InMemoryTable(pq.read_table(f))))
            else:
                parts.append(datasets.Dataset.from_file(str(f)))
        except (OSError, ValueError) as err:
            raise InputError(f"{f}: cannot read ({err})") from None
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), None


def _column(ds: Any, name: str, field: str, path: Path) -> list[Any]:
    if name not in ds.column_names:
        raise ConfigError(
            f"data.hf.{field}: no column {name!r} in {path} (columns: {', '.join(ds.column_names)})"
        )
    return list(ds[name])


def _raw_media(ds: Any, name: str, field: str, path: Path) -> list[Any]:
    """The column's values without the library's decoding (images/audio are decoded here)."""
    import datasets

    if name in ds.column_names and isinstance(ds.features[name], datasets.Image | datasets.Audio):
        ds = ds.cast_column(name, type(ds.features[name])(decode=False))
    return _column(ds, name, field, path)


def _read_clip(item: Any, where: str) -> tuple[np.ndarray, int]:
    from gptfl_ray.data.audio import read_wav

    if isinstance(item, dict) and item.get("array") is not None:
        return np.asarray(item["array"], dtype=np.float32), int(item["sampling_rate"])
    if isinstance(item, dict):
        item = item.get("bytes") or item.get("path")
    if isinstance(item, bytes | bytearray):
        import soundfile as sf

        try:
            wav, sr = sf.read(io.BytesIO(item), dtype="float32", always_2d=True)
        except (RuntimeError, sf.LibsndfileError) as err:
            raise InputError(f"{where}: cannot read audio ({err})") from None
        return wav.mean(axis=1), int(sr)
    if isinstance(item, str):
        return read_wav(item)
    raise InputError(
        f"{where}: not audio (expected an Audio feature, bytes, a path or {{array, sampling_rate}})"
    )


def _to_arrays(
    ds: Any, hf: HFDataConfig, cfg: DataConfig, path: Path, names: list[Any] | None, groups: list[Any] | None
) -> ArrayDataset:
    import datasets

    where = f"{path}[{ds.split or hf.split}]" if getattr(ds, "split", None) else str(path)
    labels = _column(ds, hf.label_column, "label_column", path)
    feature = ds.features[hf.label_column]
    if isinstance(feature, datasets.ClassLabel):
        y, label_names = np.asarray(labels, dtype=np.int64), list(feature.names)
    else:
        y, values = index(labels, names, f"{where} column {hf.label_column!r}")
        label_names = [str(v) for v in values]
    group_ids, group_names = None, None
    if hf.group_column is not None:
        group_ids, gvals = index(
            _column(ds, hf.group_column, "group_column", path), groups, f"{where} column {hf.group_column!r}"
        )
        group_names = [str(v) for v in gvals]
    if hf.image_column is not None:
        items = _raw_media(ds, hf.image_column, "image_column", path)
        x = image_array(items, [f"{where} row {i}" for i in range(len(items))], cfg.image_size)
        return ArrayDataset(
            x=x, y=y, label_names=label_names, modality="image", groups=group_ids, group_names=group_names
        )
    from gptfl_ray.data.audio import standardize_clip

    assert hf.audio_column is not None
    a = cfg.audio
    items = _raw_media(ds, hf.audio_column, "audio_column", path)
    clips = [_read_clip(it, f"{where} row {i}") for i, it in enumerate(items)]
    x = np.stack([standardize_clip(w, sr, a.sample_rate, a.clip_seconds, a.trim_silence) for w, sr in clips])
    return ArrayDataset(
        x=x,
        y=y,
        label_names=label_names,
        modality="audio",
        sample_rate=a.sample_rate,
        groups=group_ids,
        group_names=group_names,
    )


def load(cfg: DataConfig, root: Path) -> Splits | ArrayDataset:
    hf = cfg.hf
    assert hf is not None  # DataConfig's check
    path = Path(hf.path)
    pool, test = _open(path, hf.split)
    gc = hf.group_column
    groups = None  # test speakers may be unseen in training: one id space over both splits
    if gc and test is not None and gc in pool.column_names and gc in test.column_names:
        groups = sorted(set(pool[gc]) | set(test[gc]))
    train = _to_arrays(pool, hf, cfg, path, None, groups)
    if test is None:
        return train
    label_values = None if _is_classlabel(pool, hf) else _values(pool, hf.label_column)
    test_ds = _to_arrays(test, hf, cfg, path, label_values, groups)
    if test_ds.modality == "image" and test_ds.x.shape[1:] != train.x.shape[1:]:
        raise InputError(
            f"{path}: test images are {test_ds.x.shape[1:]}, train {train.x.shape[1:]} (set data.image_size)"
        )
    return Splits(train=train, test=test_ds)


def _is_classlabel(ds: Any, hf: HFDataConfig) -> bool:
    import datasets

    return isinstance(ds.features[hf.label_column], datasets.ClassLabel)


def _values(ds: Any, column: str) -> list[Any]:
    return sorted(set(ds[column]))


def check(cfg: DataConfig) -> str | None:
    return (
        None
        if cfg.hf is not None
        else "data.hf: required with data.dataset 'hf' ({path, image_column | audio_column, ...})"
    )


SPEC = register(
    DatasetSpec(
        name="hf",
        modality="",  # image_column or audio_column
        num_classes=0,
        label_names=(),  # ClassLabel names, else the label column's sorted unique values
        channels=0,  # as the images have them
        test_split="official: the saved DatasetDict's 'test' split, else held out",
        loader=load,
        from_data=True,
        options=("hf", "image_size"),
        check=check,
    )
)
