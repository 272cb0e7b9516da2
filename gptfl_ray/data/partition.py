"""Split a dataset over clients. Every function is deterministic in ``seed`` and assigns each sample once.

All return ``list[np.ndarray]`` of sample indices, one array per client.
"""

from __future__ import annotations

import numpy as np

from gptfl_ray.config import ConfigError, PartitionConfig


def iid(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Uniformly random split into near-equal parts."""
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def equal_subsets(labels: np.ndarray, num_subsets: int, seed: int) -> list[np.ndarray]:
    """N equal-size subsets with (near-)identical class proportions (stratified round-robin)."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    return [np.sort(order[i::num_subsets]) for i in range(num_subsets)]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    balanced: bool = False,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed split: per class, proportions over clients ~ Dirichlet(alpha).

    Redrawn until every client holds ``min_size`` samples. With ``balanced`` (the official GPT-FL/FedML
    partitioner) a client stops receiving once it holds N / num_clients samples.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if min_size * num_clients > n:
        raise ConfigError(f"partition.min_size: {min_size} × {num_clients} clients exceeds {n} samples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_clients, alpha))
            if balanced:
                p = p * np.array([len(q) < n / num_clients for q in parts])
                p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for q, chunk in zip(parts, np.split(idx, cuts), strict=True):
                q.extend(chunk.tolist())
        if min(len(q) for q in parts) >= min_size:
            return [np.sort(np.asarray(q, dtype=np.int64)) for q in parts]
    raise ConfigError(
        f"partition: no Dirichlet(alpha={alpha}) draw gave every client >= {min_size} samples in {max_tries} "
        "tries; lower partition.min_size or raise partition.alpha"
    )


def natural(groups: np.ndarray, sub_splits: int, seed: int) -> list[np.ndarray]:
    """One client per natural group (e.g. speaker), each optionally split into ``sub_splits`` random parts."""
    rng = np.random.default_rng(seed)
    out = []
    for g in np.unique(groups):
        idx = rng.permutation(np.flatnonzero(groups == g))
        out.extend(np.sort(p) for p in np.array_split(idx, sub_splits) if len(p))
    return out


def partition(
    cfg: PartitionConfig, labels: np.ndarray, groups: np.ndarray | None, seed: int
) -> list[np.ndarray]:
    """Dispatch on ``cfg.method``."""
    if cfg.method == "iid":
        return iid(len(labels), cfg.num_clients, seed)
    if cfg.method == "equal":
        return equal_subsets(labels, cfg.num_clients, seed)
    if cfg.method == "dirichlet":
        return dirichlet(labels, cfg.num_clients, cfg.alpha, seed, cfg.min_size, cfg.balanced)
    if groups is None:
        from gptfl_ray.data.base import known_datasets, lookup

        having = [n for n in known_datasets() if lookup(n).natural_groups]
        raise ConfigError(
            f"partition.method: 'natural' needs a dataset with natural ids (e.g. {', '.join(having)}"
            " with data.group_regex)"
        )
    return natural(groups, cfg.sub_splits, seed)


def label_entropy(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Shannon entropy (nats) of each client's label histogram: low = skewed, log(C) = uniform."""
    out = []
    for p in parts:
        h = np.bincount(labels[p], minlength=num_classes).astype(float)
        h = h[h > 0] / h.sum()
        out.append(float(-(h * np.log(h)).sum()))
    return np.asarray(out)
