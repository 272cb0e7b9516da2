"""``load_dataset(cfg.data, data_dir)`` -> train pool + held-out test set for any supported dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptfl_ray.config import ConfigError, DataConfig
from gptfl_ray.data.base import ArrayDataset, Splits, get_spec, lookup
from gptfl_ray.paths import data_dir as resolve_data_dir


def dataset_root(cfg: DataConfig, data_dir: str | Path | None = None) -> Path:
    """``data.root``; ``data.hf.path`` for Hugging Face data; the working folder for a ``module:function``;
    else ``<data dir>/<dataset>``."""
    if cfg.root:
        return Path(cfg.root)
    if cfg.hf is not None:
        return Path(cfg.hf.path)
    if ":" in cfg.dataset:
        return Path()
    return resolve_data_dir(data_dir) / cfg.dataset


def load_raw(cfg: DataConfig, root: Path) -> Splits | ArrayDataset:
    """What the dataset's loader returns: ``Splits`` (an official test set) or one ``ArrayDataset``."""
    spec = lookup(cfg.dataset)
    assert spec.loader is not None, spec.name
    return spec.loader(cfg, root)


def holdout_split(ds: ArrayDataset, num_test: int, seed: int) -> Splits:
    """Stratified random holdout of ``num_test`` samples."""
    if not 0 < num_test < len(ds):
        raise ConfigError(f"data.num_test: must be between 1 and {len(ds) - 1} (got {num_test})")
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(len(ds.label_names)):
        idx = np.flatnonzero(ds.y == c)
        k = round(num_test * len(idx) / len(ds))
        test_idx.append(rng.permutation(idx)[:k])
    test = np.sort(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(len(ds)), test)
    return Splits(train=ds.subset(train), test=ds.subset(test))


def load_dataset(cfg: DataConfig, data_dir: str | Path | None = None) -> Splits:
    """Load the train pool and test set described by ``cfg`` (see DataConfig)."""
    raw = load_raw(cfg, dataset_root(cfg, data_dir))
    if isinstance(raw, Splits) and cfg.test_split == "official":
        splits = raw
    else:
        # "holdout" asked for, or no official test set available (e.g. MNIST test-only files): carve one.
        pool = raw if isinstance(raw, ArrayDataset) else raw.train
        num_test = cfg.num_test or max(1, len(pool) // 5)
        splits = holdout_split(pool, num_test, cfg.split_seed)
    if cfg.num_test and len(splits.test) > cfg.num_test:
        keep = np.sort(np.random.default_rng(cfg.split_seed).permutation(len(splits.test))[: cfg.num_test])
        splits.test = splits.test.subset(keep)
    if cfg.num_train and len(splits.train) > cfg.num_train:
        keep = np.sort(
            np.random.default_rng(cfg.split_seed + 1).permutation(len(splits.train))[: cfg.num_train]
        )
        splits.train = splits.train.subset(keep)
    return splits


def label_names(cfg: DataConfig, data_dir: str | Path | None = None) -> list[str]:
    """The dataset's label names without loading samples where the spec knows them."""
    spec = get_spec(cfg, data_dir)  # datasets read from the user's data: loaded once per process
    if spec.label_names:
        return list(spec.label_names)
    return load_dataset(cfg, data_dir).train.label_names
