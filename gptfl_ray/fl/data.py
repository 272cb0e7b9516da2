"""The clients' data for one FL run: the real dataset, turned into model tensors and partitioned."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptfl_ray.config import ConfigError, RunConfig
from gptfl_ray.data import load_dataset
from gptfl_ray.data.features import to_tensors
from gptfl_ray.data.partition import partition


@dataclass
class FederatedData:
    clients: list[tuple[torch.Tensor, torch.Tensor]]  # per virtual client: (inputs float32, labels int64)
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    input_shape: tuple[int, int, int]
    label_names: list[str]
    public: torch.Tensor | None = None  # unlabeled public inputs held by the server (public_data section)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def client_sizes(self) -> list[int]:
        return [len(y) for _, y in self.clients]


def prepare_federated_data(
    cfg: RunConfig,
    seed: int,
    data_dir: str | Path | None = None,
    synthetic_dir: str | Path | None = None,
) -> FederatedData:
    """Load ``cfg.data``, convert to model tensors, partition the train pool over ``cfg.partition``.

    The held-out test set is fixed by ``data.split_seed`` (the same for every run seed); the partition over
    clients is drawn with the *run* ``seed``, so repeating a run over seeds also varies the partition.
    The data directory is ``cfg.data_dir``, else ``data_dir``, else ``$GPTFL_DATA_DIR``. With
    ``public_data.source: holdout`` the public set leaves the pool first (fixed by ``public_data.seed``);
    ``synthetic`` reads it from ``synthetic_dir`` (the run's generated data).
    """
    splits = load_dataset(cfg.data, cfg.data_dir or data_dir)
    public = None
    if cfg.public_data.source == "holdout":
        held, keep = public_holdout(len(splits.train), cfg.public_data.num, cfg.public_data.seed)
        public = to_tensors(splits.train.subset(held), cfg.data.dataset, cfg.data.audio)[0]
        splits.train = splits.train.subset(keep)
    elif cfg.public_data.source == "synthetic":
        public = synthetic_public(cfg, synthetic_dir)
    x, y = to_tensors(splits.train, cfg.data.dataset, cfg.data.audio)
    test = to_tensors(splits.test, cfg.data.dataset, cfg.data.audio)
    parts = partition(cfg.partition, np.asarray(splits.train.y), splits.train.groups, seed=seed)
    idx = [torch.from_numpy(np.asarray(p, dtype=np.int64)) for p in parts]
    return FederatedData(
        clients=[(x[i].contiguous(), y[i].contiguous()) for i in idx],
        test=test,
        num_classes=len(splits.train.label_names),
        input_shape=tuple(x.shape[1:]),
        label_names=list(splits.train.label_names),
        public=public,
    )


def public_holdout(pool_size: int, num: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(public indices, remaining pool indices), both sorted: ``num`` pool samples drawn with ``seed``."""
    if num is None or not 0 < num < pool_size:
        raise ConfigError(
            f"public_data.num: must be between 1 and {pool_size - 1}, the pool's size - 1 (got {num})"
        )
    order = np.random.default_rng([seed, 7]).permutation(pool_size)
    return np.sort(order[:num]), np.sort(order[num:])


def synthetic_public(cfg: RunConfig, synthetic_dir: str | Path | None) -> torch.Tensor:
    """The synthetic set's inputs as public data (labels dropped; at most ``public_data.num``, seeded)."""
    from gptfl_ray.data.synthetic import load_synthetic

    if synthetic_dir is None:
        raise ConfigError(
            "public_data.source: 'synthetic' needs the run's synthetic data (use gptfl run or gptfl sweep, which "
            "generate it, or gptfl federate --synthetic DIR)"
        )
    ds = load_synthetic(synthetic_dir, cfg.data)
    num = cfg.public_data.num
    if num is not None and num < len(ds):
        ds = ds.subset(np.sort(np.random.default_rng([cfg.public_data.seed, 7]).permutation(len(ds))[:num]))
    return to_tensors(ds, cfg.data.dataset, cfg.data.audio)[0]
