"""``load_dataset(cfg.data, data_dir)`` -> train pool + held-out test set for any supported dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptfl_ray.config import ConfigError, DataConfig
from gptfl_ray.data.base import ArrayDataset, Splits, get_spec
from gptfl_ray.paths import data_dir as resolve_data_dir


def dataset_root(cfg: DataConfig, data_dir: str | Path | None = None) -> Path:
    return Path(cfg.root) if cfg.root else resolve_data_dir(data_dir) / cfg.dataset


def _load_raw(cfg: DataConfig, root: Path) -> Splits | ArrayDataset:
    if cfg.dataset == "mnist":
        from gptfl_ray.data.mnist import load_mnist

        if (root / "train-images-idx3-ubyte.gz").is_file() and cfg.test_split == "official":
            return Splits(train=load_mnist(root, "train"), test=load_mnist(root, "test"))
        return load_mnist(root, "test")
    if cfg.dataset == "fsdd":
        from gptfl_ray.data.fsdd import load_fsdd

        return load_fsdd(root, cfg.audio)
    if cfg.dataset == "speech_commands":
        from gptfl_ray.data.speech_commands import load_speech_commands

        splits = load_speech_commands(root, cfg.audio)
        return splits if len(splits.test) else splits.train
    if cfg.dataset == "esc50":
        from gptfl_ray.data.esc50 import load_esc50

        return load_esc50(root, cfg.audio)
    if cfg.dataset in ("cifar10", "cifar100"):
        from gptfl_ray.data.vision import load_cifar

        return load_cifar(cfg.dataset, root)
    if cfg.dataset == "flowers102":
        from gptfl_ray.data.vision import load_flowers102

        return load_flowers102(root)
    raise ConfigError(f"data.dataset: unknown dataset {cfg.dataset!r}")


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
    raw = _load_raw(cfg, dataset_root(cfg, data_dir))
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
    spec = get_spec(cfg.dataset)
    if spec.label_names:
        return list(spec.label_names)
    return load_dataset(cfg, data_dir).train.label_names
