"""The clients' data for one FL run: the real dataset, turned into model tensors and partitioned."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptfl_ray.config import RunConfig
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

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def client_sizes(self) -> list[int]:
        return [len(y) for _, y in self.clients]


def prepare_federated_data(cfg: RunConfig, seed: int, data_dir: str | Path | None = None) -> FederatedData:
    """Load ``cfg.data``, convert to model tensors, partition the train pool over ``cfg.partition``.

    The held-out test set is fixed by ``data.split_seed`` (the same for every run seed); the partition over
    clients is drawn with the *run* ``seed``, so repeating a run over seeds also varies the partition.
    The data directory is ``cfg.data_dir``, else ``data_dir``, else ``$GPTFL_DATA_DIR``.
    """
    splits = load_dataset(cfg.data, cfg.data_dir or data_dir)
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
    )
