"""FL runtime throughput: Ray client actors vs a plain sequential PyTorch loop doing the same arithmetic.

Workload (defaults): 100 clients × 600 random 1×28×28 images, the MNIST CNN, FedAvg, 10 clients per round,
20 rounds, local SGD lr 0.01 (no momentum), batch 32, 1 epoch, evaluation on 2,000 images every round;
ours runs 2 client actors with 1 CPU each. The plain loop (1 and 2 torch threads) samples the same clients,
trains them one after another from the same global weights, averages sample-weighted and evaluates.
Prints client-updates/s measured over the rounds (set-up excluded; end-to-end also shown) and the ratios.

The scale variant runs ours alone in a fresh process for 100 and 1,000 clients holding the *same total*
number of samples, and prints peak RSS of the driver and of the client actors: memory must be flat in the
number of clients (shards live once in the object store; per-client cost is an ObjectRef and a size).

Not a timed test: run on an otherwise idle machine.

    python bench/fl_throughput.py                      # full size
    python bench/fl_throughput.py --rounds 3 --clients 20 --scale-clients 200   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

from gptfl_ray.config import RunConfig, validate_config
from gptfl_ray.fl.client import task_seed
from gptfl_ray.fl.data import FederatedData
from gptfl_ray.fl.server import sample_clients
from gptfl_ray.models import build_model


def workload(num_clients: int, samples: int, eval_samples: int, seed: int = 0) -> FederatedData:
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


def fl_config(args: argparse.Namespace) -> RunConfig:
    return validate_config(
        {
            "model": {"name": "cnn"},
            "fl": {
                "strategy": {"name": "fedavg"},
                "rounds": args.rounds,
                "clients_per_round": args.per_round,
                "local": {
                    "epochs": 1,
                    "batch_size": 32,
                    "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.0},
                },
                "eval_every": 1,
                "eval_batch_size": 500,
                "checkpoint_every": 0,
                "num_actors": args.actors,
                "actor_num_cpus": 1,
            },
        }
    )


# ------------------------------------------------------------------------------------------ plain loop
def plain_loop(cfg: RunConfig, data: FederatedData, threads: int, seed: int = 0) -> dict[str, float]:
    """Sequential FedAvg in one process: same sampling, local recipe, weighting and evaluation."""
    torch.set_num_threads(threads)
    fl = cfg.fl
    torch.manual_seed(seed)
    model = build_model("cnn", 10, data.input_shape)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = nn.CrossEntropyLoss()
    updates, t_rounds = 0, 0.0
    for rnd in range(1, fl.rounds + 1):
        t0 = time.perf_counter()
        sampled = sample_clients(
            data.num_clients, fl.clients_per_round, seed=seed, rnd=rnd, with_replacement=False
        )
        total = {k: torch.zeros_like(v) for k, v in global_state.items()}
        weight = 0
        for slot, cid in enumerate(sampled):
            x, y = data.clients[cid]
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=fl.local.optimizer.lr)
            model.train()
            g = torch.Generator().manual_seed(task_seed(seed, rnd, cid, slot))
            order = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), fl.local.batch_size):
                idx = order[i : i + fl.local.batch_size]
                opt.zero_grad()
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
            for k, v in model.state_dict().items():
                total[k].add_(v - global_state[k], alpha=len(y))
            weight += len(y)
            updates += 1
        global_state = {k: v + total[k] / weight for k, v in global_state.items()}
        model.load_state_dict(global_state)
        model.eval()
        with torch.no_grad():
            tx, ty = data.test
            correct = sum(
                int((model(tx[i : i + 500]).argmax(1) == ty[i : i + 500]).sum())
                for i in range(0, len(ty), 500)
            )
        assert 0 <= correct <= len(ty)
        t_rounds += time.perf_counter() - t0
    return {"updates_per_s": updates / t_rounds, "round_s": t_rounds / fl.rounds}


# ------------------------------------------------------------------------------------------ ours
class ActorMemory:
    """Samples the RSS/USS of this run's client-actor processes (``ray::FLClient*``) in the background."""

    def __init__(self, interval: float = 0.5):
        import psutil

        self.psutil, self.interval = psutil, interval
        self.peak_rss: dict[int, float] = {}
        self.peak_uss: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self.psutil.process_iter(["pid", "cmdline"]):
                try:
                    if "ray::FLClient" not in " ".join(p.info["cmdline"] or []):
                        continue
                    mem = p.memory_full_info()
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    continue
                self.peak_rss[p.pid] = max(self.peak_rss.get(p.pid, 0), mem.rss / 2**20)
                self.peak_uss[p.pid] = max(self.peak_uss.get(p.pid, 0), mem.uss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> ActorMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def ours(cfg: RunConfig, data: FederatedData, seed: int = 0) -> dict[str, float]:
    from gptfl_ray.fl.runner import run_federated
    from gptfl_ray.io import read_jsonl

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as out, ActorMemory() as mem:
        s = run_federated(cfg, seed=seed, out_dir=Path(out), data=data)
        recs = read_jsonl(Path(out) / "metrics.jsonl")
    wall = time.perf_counter() - t0
    t_rounds = sum(r["wall_time_s"] for r in recs)
    updates = sum(r["num_updates"] for r in recs)
    return {
        "updates_per_s": updates / t_rounds,
        "round_s": t_rounds / len(recs),
        "e2e_updates_per_s": updates / wall,
        "wall_s": wall,
        "final_accuracy": s["final_accuracy"],
        "actor_peak_rss_mb": max(mem.peak_rss.values(), default=float("nan")),
        "actor_peak_uss_mb": max(mem.peak_uss.values(), default=float("nan")),
    }


def init_ray(actors: int) -> None:
    import ray

    ray.init(num_cpus=actors, include_dashboard=False, configure_logging=False, log_to_driver=False)


# ------------------------------------------------------------------------------------------ main
def scale_child(args: argparse.Namespace) -> None:
    """One run of ours in this (fresh) process; prints a JSON line with throughput and memory."""
    data = workload(args.clients, args.samples, args.eval)
    init_ray(args.actors)
    r = ours(fl_config(args), data)
    r.update(
        clients=args.clients,
        samples=args.samples,
        driver_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    print("RESULT " + json.dumps(r), flush=True)


def run_scale_child(args: argparse.Namespace, clients: int, samples: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--clients",
        str(clients),
        "--samples",
        str(samples),
        "--rounds",
        str(args.rounds),
        "--per-round",
        str(args.per_round),
        "--eval",
        str(args.eval),
        "--actors",
        str(args.actors),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def throughput(args: argparse.Namespace) -> None:
    print(
        f"workload: {args.clients} clients × {args.samples} samples, {args.per_round}/round, {args.rounds} "
        f"rounds, eval {args.eval}; ours: {args.actors} actors × 1 CPU; machine: {os.cpu_count()} CPUs"
    )
    data = workload(args.clients, args.samples, args.eval)
    cfg = fl_config(args)
    plain = {t: plain_loop(cfg, data, t) for t in (1, 2)}
    for t, r in plain.items():
        print(
            f"plain loop, {t} thread(s): {r['updates_per_s']:7.2f} client-updates/s  ({r['round_s']:.2f} s/round)"
        )
    torch.set_num_threads(1)
    init_ray(args.actors)
    r = ours(cfg, data)
    best = max(p["updates_per_s"] for p in plain.values())
    print(
        f"ours (Ray actors)      : {r['updates_per_s']:7.2f} client-updates/s  ({r['round_s']:.2f} s/round); "
        f"end-to-end incl. start-up {r['e2e_updates_per_s']:.2f}/s over {r['wall_s']:.1f} s"
    )
    for t, p in plain.items():
        print(f"ratio ours / plain {t} thread(s): {r['updates_per_s'] / p['updates_per_s']:.2f}")
    print(f"ratio ours / best plain: {r['updates_per_s'] / best:.2f}  (target >= 0.90)")
    import ray

    ray.shutdown()


def scale(args: argparse.Namespace) -> None:
    total = args.clients * args.samples
    print(f"scale: the same {total} samples over more clients, ours only, a fresh process each")
    for n in (args.clients, args.scale_clients):
        s = run_scale_child(args, n, max(1, total // n))
        print(
            f"  {s['clients']:5d} clients × {s['samples']:4d}: driver peak RSS {s['driver_peak_rss_mb']:6.0f} MiB, "
            f"actor peak RSS {s['actor_peak_rss_mb']:5.0f} MiB (USS {s['actor_peak_uss_mb']:.0f}), "
            f"{s['updates_per_s']:.2f} client-updates/s"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--samples", type=int, default=600, help="samples per client")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--eval", type=int, default=2000)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--scale-clients", type=int, default=1000, help="clients of the scale variant (0: skip)")
    ap.add_argument("--only-scale", action="store_true", help="skip the throughput comparison")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        scale_child(args)
        return
    if not args.only_scale:
        throughput(args)
    if args.scale_clients:
        scale(args)


if __name__ == "__main__":
    main()
