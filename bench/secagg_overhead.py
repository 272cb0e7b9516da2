"""Secure aggregation overhead: time and bytes per FL aggregation round, SecAgg vs plain weighted averaging.

Both arms run over the same Ray actors (``--actors`` hosts, each serving many virtual clients, as FL does) and
aggregate the same per-client float32 updates of ``--params`` parameters with sample-count weights:

  plain   hosts return (update, n) in float32; the server computes the weighted mean.
  secagg  hosts quantise [n·Δ, n] into Z_2^k and run the four SecAgg rounds (Bonawitz et al. 2017); the server
          decodes the weighted mean from the masked sum. ``--dropout`` clients drop after key sharing.

Bytes are the logical client<->server traffic of the aggregation (as if every client were its own machine):
plain = uploads; secagg = keys, encrypted shares, masked vectors, survivor lists and unmasking shares, both
directions. The model broadcast is the same in both arms and is not counted. Not a timed test: run it on an
otherwise idle machine.

    python bench/secagg_overhead.py [--clients 10 100] [--params 200000] [--rounds 2] [--actors 2]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from gptfl_ray.labels.ring import Ring, decode_weighted, encode_weighted, fixed_point_scale
from gptfl_ray.labels.secagg_ray import SecAggHost, secure_sum


class BenchHost(SecAggHost):
    """Serves the virtual clients ``cids``: fixed float32 updates and sample counts."""

    def __init__(
        self, cids: list[int], params: int, ring_bits: int, scale: float, clip: float, drop: set[int]
    ) -> None:
        self.ring, self.scale, self.clip, self.drop = Ring.bits(ring_bits), scale, clip, drop
        self.updates = {
            c: np.random.default_rng(c).normal(scale=0.01, size=params).astype(np.float32) for c in cids
        }
        self.weights = {c: int(np.random.default_rng(c).integers(50, 600)) for c in cids}

    def plain_updates(self, cids: list[int]) -> dict[int, tuple[np.ndarray, int]]:
        return {c: (self.updates[c], self.weights[c]) for c in cids}

    def secagg_vector(self, cid: int, round_id: int) -> np.ndarray | None:
        if cid in self.drop:
            return None  # shared its keys, then vanished
        return encode_weighted(self.updates[cid], self.weights[cid], self.ring, self.scale, self.clip)


def plain_round(ray, owner: dict[int, object]) -> tuple[np.ndarray, int]:
    by_host: dict[object, list[int]] = {}
    for cid, h in owner.items():
        by_host.setdefault(h, []).append(cid)
    total, weight = None, 0
    for per_host in ray.get([h.plain_updates.remote(c) for h, c in by_host.items()]):
        for update, n in per_host.values():
            total = n * update.astype(np.float64) if total is None else total + n * update
            weight += n
    return total / weight, weight


def run(ray, num_clients: int, args: argparse.Namespace) -> dict[str, float]:
    ring = Ring.bits(args.ring_bits)
    clip, max_weight = 1.0, 600
    scale = fixed_point_scale(ring, num_clients * max_weight * clip)
    rng = np.random.default_rng(0)
    dropped = {int(c) for c in rng.choice(num_clients, int(args.dropout * num_clients), replace=False)}
    actor = ray.remote(num_cpus=0)(BenchHost)
    layout = [list(range(i, num_clients, args.actors)) for i in range(args.actors)]
    hosts = [actor.remote(cids, args.params, args.ring_bits, scale, clip, dropped) for cids in layout]
    owner = {c: h for h, cids in zip(hosts, layout, strict=True) for c in cids}
    ray.get([h.plain_updates.remote([]) for h in hosts])  # actors up before timing

    plain_times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        plain_mean, _ = plain_round(ray, owner)
        plain_times.append(time.perf_counter() - t0)
    plain_bytes = num_clients * (4 * args.params + 8)

    threshold = max(1, math.ceil(args.threshold * num_clients))
    sec_times = []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        result = secure_sum(
            owner,
            round_id=r,
            vector_len=args.params + 1,
            threshold=threshold,
            ring=ring,
            session="bench",
        )
        mean, _ = decode_weighted(result.total, ring, scale)
        sec_times.append(time.perf_counter() - t0)
    if dropped:  # compare with plain averaging over the same survivors
        plain_mean, _ = plain_round(ray, {c: owner[c] for c in result.included})
    err = float(np.max(np.abs(mean - plain_mean)))
    for h in hosts:
        ray.kill(h)
    return {
        "plain_s": float(np.median(plain_times)),
        "secagg_s": float(np.median(sec_times)),
        "plain_bytes": plain_bytes,
        "secagg_bytes": result.stats.total_in + result.stats.total_out,
        "secagg_bytes_in": result.stats.total_in,
        "included": len(result.included),
        "max_abs_err": err,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--params", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--ring-bits", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.6)
    ap.add_argument("--dropout", type=float, default=0.0)
    args = ap.parse_args()

    import ray

    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    print(
        f"workload: {args.params:,} parameters, ring Z_2^{args.ring_bits}, {args.actors} actors, "
        f"threshold {args.threshold:.0%}, dropout {args.dropout:.0%}, median of {args.rounds} round(s)"
    )
    print(
        f"{'clients':>7} | {'plain s':>8} {'secagg s':>9} {'time x':>7} | {'plain MB':>9} {'secagg MB':>10} {'bytes x':>7} | max |err|"
    )
    for n in args.clients:
        r = run(ray, n, args)
        print(
            f"{n:>7} | {r['plain_s']:>8.3f} {r['secagg_s']:>9.3f} {r['secagg_s'] / r['plain_s']:>7.1f} | "
            f"{r['plain_bytes'] / 1e6:>9.2f} {r['secagg_bytes'] / 1e6:>10.2f} "
            f"{r['secagg_bytes'] / r['plain_bytes']:>7.2f} | {r['max_abs_err']:.1e}"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
