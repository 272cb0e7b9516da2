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

``--mode fl`` measures whole FL rounds instead (``run_federated`` with ``fl.secure_aggregation`` on and off):
the MNIST CNN (225k parameters), ``--clients`` clients per round, each with ``--samples`` random 1×28×28
images and one local epoch, on the same ``--actors`` client actors. Per round (median over rounds 2..R;
round 1 warms the actors up): wall time without evaluation, the SecAgg protocol's share of it, and bytes
up/down as the round records count them (plain: float32 updates and weights; secagg adds every protocol
message, masked vectors at 4 bytes per value in Z_2^32). This is the honest per-FL-round cost: plain
updates travel through the object store to the server, masked ones stay in the actors until the protocol.

    python bench/secagg_overhead.py [--clients 10 100] [--params 200000] [--rounds 2] [--actors 2]
    python bench/secagg_overhead.py --mode fl [--clients 10 100] [--samples 32] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gptfl_ray.labels.ring import Ring, decode_weighted, encode_weighted, fixed_point_scale
from gptfl_ray.labels.secagg import threshold_count
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

    minority = args.threshold <= 0.5  # the protocol refuses a minority threshold unless told it is meant
    threshold = threshold_count(args.threshold, num_clients, allow_minority=minority)
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
            allow_minority=minority,
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


# ------------------------------------------------------------------------------------------ FL rounds
def fl_workload(num_clients: int, samples: int, eval_samples: int = 200, seed: int = 0):
    import torch

    from gptfl_ray.fl.data import FederatedData

    g = torch.Generator().manual_seed(seed)
    clients = [
        (torch.randn(samples, 1, 28, 28, generator=g), torch.randint(0, 10, (samples,), generator=g))
        for _ in range(num_clients)
    ]
    test = (
        torch.randn(eval_samples, 1, 28, 28, generator=g),
        torch.randint(0, 10, (eval_samples,), generator=g),
    )
    return FederatedData(clients, test, 10, (1, 28, 28), [str(i) for i in range(10)])


def fl_run(num_clients: int, secure: bool, args: argparse.Namespace) -> dict[str, float]:
    from gptfl_ray.config import validate_config
    from gptfl_ray.fl.runner import run_federated
    from gptfl_ray.io import read_jsonl

    cfg = validate_config(
        {
            "model": {"name": "cnn"},
            "fl": {
                "strategy": {"name": "fedavg"},
                "rounds": args.rounds,
                "clients_per_round": num_clients,
                "local": {
                    "epochs": 1,
                    "batch_size": 32,
                    "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.0},
                },
                "eval_every": args.rounds,
                "checkpoint_every": 0,
                "num_actors": args.actors,
                "secure_aggregation": secure,
                "secagg_ring_bits": args.ring_bits,
                "secagg_threshold": args.threshold,
                "secagg_allow_minority_threshold": args.threshold <= 0.5,
            },
        }
    )
    with tempfile.TemporaryDirectory() as out:
        run_federated(cfg, seed=0, out_dir=Path(out), data=fl_workload(num_clients, args.samples))
        recs = read_jsonl(Path(out) / "metrics.jsonl")
    recs = recs[1:] or recs  # round 1 includes warm-up (first tasks on fresh actors)
    return {
        "round_s": statistics.median(r["wall_time_s"] - r.get("eval_s", 0.0) for r in recs),
        "secagg_s": statistics.median(r["secagg"]["seconds"] for r in recs) if secure else 0.0,
        "bytes_up": statistics.median(r["bytes_up"] for r in recs),
        "bytes_down": statistics.median(r["bytes_down"] for r in recs),
        "params": recs[0]["params_down"] // num_clients,
    }


def fl_main(ray, args: argparse.Namespace) -> None:
    print(
        f"FL rounds: MNIST CNN, {args.samples} random images per client, 1 local epoch, {args.actors} actors, "
        f"ring Z_2^{args.ring_bits}, threshold {args.threshold:.0%}, median of rounds 2-{args.rounds}"
    )
    print(
        f"{'clients':>7} | {'plain s':>8} {'secagg s':>9} {'(proto)':>8} {'time x':>7} | "
        f"{'plain MB up/down':>17} {'secagg MB up/down':>18} {'up x':>5}"
    )
    for n in args.clients:
        p, s = fl_run(n, False, args), fl_run(n, True, args)
        print(
            f"{n:>7} | {p['round_s']:>8.2f} {s['round_s']:>9.2f} {s['secagg_s']:>8.2f} "
            f"{s['round_s'] / p['round_s']:>7.2f} | {p['bytes_up'] / 1e6:>8.2f}/{p['bytes_down'] / 1e6:<8.2f} "
            f"{s['bytes_up'] / 1e6:>9.2f}/{s['bytes_down'] / 1e6:<8.2f} {s['bytes_up'] / p['bytes_up']:>5.3f}"
        )
    print(f"model: {p['params']:,} values per client vector")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["aggregation", "fl"], default="aggregation")
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--params", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=None, help="default: 2 (aggregation), 4 (fl)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument(
        "--ring-bits", type=int, default=None, help="default: 64 (aggregation), 32 (fl, its default)"
    )
    ap.add_argument("--threshold", type=float, default=0.6)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--samples", type=int, default=32, help="fl: images per client")
    args = ap.parse_args()
    fl_mode = args.mode == "fl"
    args.rounds = args.rounds or (4 if fl_mode else 2)
    args.ring_bits = args.ring_bits or (32 if fl_mode else 64)

    import ray

    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    if fl_mode:
        fl_main(ray, args)
        ray.shutdown()
        return
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
