"""``gptfl collect-labels``: the union of the clients' label names, collected privately.

Client actors (``label-client-<i>``, each hosting many virtual clients as FL actors do) load their own data
shards, encode their clients' label names into IBLTs, and take part in secure aggregation; the driver (the
server) only ever sees masked tables and their sum, which it decodes into the label union with per-label
client counts. Writes ``labels.json`` (read by the prompt stage)::

    {"labels": [...], "client_counts": {name: k}, "num_clients": N, "iblt": {...}, "secagg": {...}}
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_ray.config import ConfigError, RunConfig
from gptfl_ray.io import atomic_write_json
from gptfl_ray.labels.iblt import IBLT, IBLTDecodeError
from gptfl_ray.labels.secagg import threshold_count
from gptfl_ray.labels.secagg_ray import SecAggHost, secure_sum
from gptfl_ray.paths import ENV_VAR
from gptfl_ray.paths import data_dir as resolve_data_dir
from gptfl_ray.ray_env import ensure_ray

log = logging.getLogger(__name__)
SESSION = "labels"


class LabelClientHost(SecAggHost):
    """Ray actor body: hosts every ``num_hosts``-th client, holds only its own clients' label names."""

    def setup(
        self, cfg: RunConfig, seed: int, data_dir: str | None, host_index: int, num_hosts: int, iblt: dict
    ) -> list[int]:
        """Load and partition the data as the FL clients do; returns the client ids hosted here."""
        from gptfl_ray.data import load_dataset
        from gptfl_ray.data.partition import partition

        train = load_dataset(cfg.data, data_dir).train
        parts = partition(cfg.partition, train.y, train.groups, seed)
        cids = list(range(host_index, len(parts), num_hosts))
        self._labels = {
            c: sorted({train.label_names[int(k)] for k in np.unique(train.y[parts[c]])}) for c in cids
        }
        self._iblt = IBLT.from_params(iblt)
        self._num_clients = len(parts)
        return cids

    def num_clients(self) -> int:
        return self._num_clients

    def secagg_vector(self, cid: int, round_id: int) -> np.ndarray:
        return self._iblt.encode(self._labels[cid])


def _start_hosts(
    cfg: RunConfig, seed: int, data_dir: str | None, iblt: IBLT
) -> tuple[list[Any], dict[int, Any]]:
    import ray

    num_hosts = cfg.fl.num_actors
    actor_cls = ray.remote(LabelClientHost)
    hosts = [
        actor_cls.options(name=f"label-client-{i}", num_cpus=cfg.fl.actor_num_cpus).remote()
        for i in range(num_hosts)
    ]
    deadline = (
        cfg.labels.secagg_timeout_s
    )  # loading a client's data counts as one stage: no wait is open-ended
    try:
        ids = ray.get(
            [h.setup.remote(cfg, seed, data_dir, i, num_hosts, iblt.describe()) for i, h in enumerate(hosts)],
            timeout=deadline,
        )
    except ray.exceptions.GetTimeoutError:
        for h in hosts:
            ray.kill(h)
        raise TimeoutError(
            f"label collection: the client hosts did not load their data within {deadline:g} s "
            "(labels.secagg_timeout_s)"
        ) from None
    except (
        ray.exceptions.RayTaskError
    ) as err:  # bad data/partition config: surface the original one-line error
        for h in hosts:
            ray.kill(h)
        raise (err.cause if isinstance(err.cause, Exception) else err) from None
    return hosts, {cid: h for h, cids in zip(hosts, ids, strict=True) for cid in cids}


def _ordered(names: list[str], dataset_names: list[str]) -> list[str]:
    """Dataset labels in class-index order; anything else alphabetically."""
    index = {n: i for i, n in enumerate(dataset_names)}
    if all(n in index for n in names):
        return sorted(names, key=index.__getitem__)
    return sorted(names)


def collect_labels(
    cfg: RunConfig, seed: int, data_dir: str | Path | None = None, output: Path | None = None
) -> dict[str, Any]:
    """Run private label collection; returns (and writes to ``output`` if given) the labels.json content."""
    import ray

    from gptfl_ray.data.registry import label_names

    lc = cfg.labels
    if cfg.partition.method != "natural" and cfg.partition.num_clients < 2:
        raise ConfigError(
            "partition.num_clients: private label collection needs at least 2 clients "
            "(the secure sum of one client's table is that client's labels)"
        )
    data_dir = cfg.data_dir or data_dir or os.environ.get(ENV_VAR)  # the project-wide precedence
    if cfg.data.root is None:
        data_dir = str(resolve_data_dir(data_dir))  # fail here, in one line, when no data dir is known
    iblt = IBLT(lc.iblt_capacity, lc.iblt_repetitions, seed=seed, max_label_bytes=lc.iblt_max_label_bytes)
    started = ensure_ray(cfg.ray_address, announce=True) is not None
    hosts: list[Any] = []
    try:
        hosts, clients = _start_hosts(cfg, seed, str(data_dir) if data_dir else None, iblt)
        num_clients = len(clients)
        threshold = threshold_count(lc.secagg_threshold, num_clients, lc.secagg_allow_minority_threshold)
        log.info(
            "collecting labels from %d clients on %d actors (threshold %d)",
            num_clients,
            len(hosts),
            threshold,
        )
        result = secure_sum(
            clients,
            round_id=0,
            vector_len=iblt.vector_len,
            threshold=threshold,
            ring=iblt.ring,
            session=SESSION,
            timeout_s=lc.secagg_timeout_s,
            allow_minority=lc.secagg_allow_minority_threshold,
        )
    finally:
        for h in hosts:
            ray.kill(h)
        if started:
            ray.shutdown()
    counts = iblt.decode(result.total)
    bad = {k: c for k, c in counts.items() if not 0 < c <= len(result.included)}
    if bad:
        raise IBLTDecodeError(
            f"IBLT decode gave impossible client counts {bad}: the aggregated table is corrupted"
        )
    names = _ordered(list(counts), label_names(cfg.data, data_dir))
    out = {
        "labels": names,
        "client_counts": {n: counts[n] for n in names},
        "num_clients": num_clients,
        "num_included": len(result.included),
        "dropped_clients": result.dropped,
        "dataset": cfg.data.dataset,
        "seed": seed,
        "iblt": iblt.describe(),
        "secagg": {
            "threshold": threshold,
            "modulus": iblt.ring.modulus,
            "bytes_in": result.stats.total_in,
            "bytes_out": result.stats.total_out,
        },
    }
    if output is not None:
        atomic_write_json(output, out)
        log.info("wrote %d labels to %s", len(names), output)
    return out


def collect_command(args: Any) -> int:
    """CLI handler: ``gptfl collect-labels CONFIG [--output FILE] [--data-dir DIR]``."""
    cfg: RunConfig = args.cfg
    output = Path(args.output) if getattr(args, "output", None) else Path(cfg.output_dir) / "labels.json"
    out = collect_labels(cfg, cfg.seeds[0], data_dir=getattr(args, "data_dir", None), output=output)
    dropped = f", {len(out['dropped_clients'])} dropped" if out["dropped_clients"] else ""
    print(
        f"{len(out['labels'])} labels from {out['num_included']}/{out['num_clients']} clients{dropped} -> {output}"
    )
    return 0
