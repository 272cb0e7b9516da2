"""FL runtime throughput: Ray client actors vs a plain sequential PyTorch loop doing the same arithmetic.

Workload (defaults): 100 clients × 600 random 1×28×28 images, the MNIST CNN, FedAvg, 10 clients per round,
20 rounds, local SGD lr 0.01 (no momentum), batch 32, 1 epoch, evaluation on 2,000 images every round;
ours runs 2 client actors with 1 CPU each. The plain loop (1 and 2 torch threads) samples the same clients,
trains them one after another from the same global weights, averages sample-weighted and evaluates.

Printed for each: the steady rate (client updates/s over rounds 2..R), the end-to-end rate (updates over the
whole call: set-up, every round, teardown) and when the first round ended (its evaluation included), counted
from the start of the loop / the ``run_federated`` call; then the 2-core ideal (2 × the 1-thread loop's steady
rate) and the ratios against the targets. Ray is started before the call, as a session or a Tune trial would
have it; its start time is printed apart.

The scale variant runs ours alone in a fresh process for 100 clients × 600 samples and 10,000 clients × 6
samples (the *same* 60,000 samples) and prints the peak RSS of the driver and of the client actors (the
kernel's high-water mark, read by each process itself): memory must be flat in the number of clients.

Not a timed test: run on an otherwise idle machine.

    python bench/fl_throughput.py                      # full size
    python bench/fl_throughput.py --rounds 3 --clients 20 --samples 60 --scale-clients 200   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from gptfl_ray.config import RunConfig, validate_config
from gptfl_ray.fl.client import FLClient, task_seed
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
    t_start = time.perf_counter()
    fl = cfg.fl
    torch.manual_seed(seed)
    model = build_model("cnn", 10, data.input_shape)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = nn.CrossEntropyLoss()
    updates, seconds = [], []  # per round
    for rnd in range(1, fl.rounds + 1):
        t0 = time.perf_counter()
        updates.append(0)
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
            updates[-1] += 1
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
        seconds.append(time.perf_counter() - t0)
        if rnd == 1:
            first_round = time.perf_counter() - t_start
    return rates(updates, seconds, time.perf_counter() - t_start, first_round)


def rates(updates: list[int], seconds: list[float], wall_s: float, first_round_s: float) -> dict[str, float]:
    """Steady rate over rounds 2..R (all rounds when there is one), end-to-end rate, first round's end."""
    steady = slice(1, None) if len(updates) > 1 else slice(None)
    return {
        "steady": sum(updates[steady]) / sum(seconds[steady]),
        "round_s": sum(seconds[steady]) / len(seconds[steady]),
        "e2e": sum(updates) / wall_s,
        "wall_s": wall_s,
        "first_round_s": first_round_s,
    }


# ------------------------------------------------------------------------------------------ ours
def peak_rss_mb() -> float:
    """This process's peak RSS so far (the kernel's high-water mark), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measured_client(folder: Path) -> type[FLClient]:
    """The client actor, leaving its peak RSS in ``folder/<pid>`` after every task (a write, no sampling)."""

    class MeasuredClient(FLClient):
        def _note(self, out):
            (folder / str(os.getpid())).write_text(str(peak_rss_mb()))
            return out

        def train(self, *args):
            return self._note(super().train(*args))

        def evaluate(self, *args):
            return self._note(super().evaluate(*args))

    return MeasuredClient


def ours(cfg: RunConfig, data: FederatedData, seed: int = 0) -> dict[str, float]:
    from gptfl_ray.fl.runner import run_federated
    from gptfl_ray.io import read_jsonl

    ended: dict[int, float] = {}  # round -> when its record (evaluation included) was complete
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp:
        out, rss = Path(tmp) / "run", Path(tmp) / "rss"
        rss.mkdir()
        t0 = time.perf_counter()
        s = run_federated(
            cfg,
            seed=seed,
            out_dir=out,
            data=data,
            client_cls=measured_client(rss),
            on_round=lambda rec: ended.setdefault(rec["round"], time.perf_counter()),
            on_round_overlaps=True,  # a timestamp: the evaluation still overlaps the next round
        )
        wall = time.perf_counter() - t0
        recs = read_jsonl(out / "metrics.jsonl")
        actor_rss = [float(f.read_text()) for f in rss.iterdir()]
    r = rates([x["num_updates"] for x in recs], [x["wall_time_s"] for x in recs], wall, ended[1] - t0)
    r.update(
        final_accuracy=s["final_accuracy"],
        actor_peak_rss_mb=max(actor_rss, default=float("nan")),
        driver_peak_rss_mb=peak_rss_mb(),
    )
    return r


def init_ray(actors: int) -> None:
    import ray

    ray.init(num_cpus=actors, include_dashboard=False, configure_logging=False, log_to_driver=False)


# ------------------------------------------------------------------------------------------ main
def scale_child(args: argparse.Namespace) -> None:
    """One run of ours in this (fresh) process; prints a JSON line with throughput and memory."""
    data = workload(args.clients, args.samples, args.eval)
    init_ray(args.actors)
    r = ours(fl_config(args), data)
    r.update(clients=args.clients, samples=args.samples)
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
    rows = {f"plain loop, {t} thread{'s' if t > 1 else ''}": plain_loop(cfg, data, t) for t in (1, 2)}
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    init_ray(args.actors)
    ray_s = time.perf_counter() - t0
    rows[f"ours, {args.actors} actors"] = r = ours(cfg, data)
    import ray

    ray.shutdown()
    print(f"{'':22s}  {'steady':>9s}  {'end to end':>10s}  {'first round ends':>16s}   (client updates/s, s)")
    for name, x in rows.items():
        print(
            f"{name:22s}  {x['steady']:9.2f}  {x['e2e']:10.2f}  {x['first_round_s']:14.2f} s"
            f"   ({x['round_s']:.2f} s/round, {x['wall_s']:.1f} s in all)"
        )
    one = rows["plain loop, 1 thread"]
    ideal = 2 * one["steady"]
    best = max(rows["plain loop, 1 thread"]["e2e"], rows["plain loop, 2 threads"]["e2e"])
    print(f"{'2-core ideal':22s}  {ideal:9.2f}   (2 × the 1-thread loop's steady rate)")
    print(f"ray.init before ours: {ray_s:.2f} s (not in ours' times)")
    ratios = [("steady, ours / 2-core ideal", r["steady"] / ideal, ">= 0.90")]
    for name in ("plain loop, 1 thread", "plain loop, 2 threads"):
        ratios.append((f"steady, ours / {name}", r["steady"] / rows[name]["steady"], ""))
        ratios.append((f"end to end, ours / {name}", r["e2e"] / rows[name]["e2e"], ""))
    ratios.append(("end to end, ours / best plain loop", r["e2e"] / best, ">= 0.90"))
    ratios.append(
        ("first round's end, ours / plain 1 thread", r["first_round_s"] / one["first_round_s"], "<= 1.50")
    )
    for label, value, target in ratios:
        print(f"{label + ':':44s} {value:5.2f}" + (f"  (target {target})" if target else ""))


def scale(args: argparse.Namespace) -> None:
    total = args.clients * args.samples
    print(f"scale: the same {total} samples over more clients, ours only, a fresh process each")
    base = None
    for n in (args.clients, args.scale_clients):
        s = run_scale_child(args, n, max(1, total // n))
        ratio = ""
        if base is not None:
            d, a = (
                s["driver_peak_rss_mb"] / base["driver_peak_rss_mb"],
                s["actor_peak_rss_mb"] / base["actor_peak_rss_mb"],
            )
            ratio = f"  (× {d:.2f} / × {a:.2f} the {base['clients']}-client run's; target <= 1.10)"
        print(
            f"  {s['clients']:6d} clients × {s['samples']:4d}: driver peak RSS {s['driver_peak_rss_mb']:6.0f} MiB, "
            f"actor peak RSS {s['actor_peak_rss_mb']:5.0f} MiB, {s['steady']:.2f} client-updates/s{ratio}"
        )
        base = base or s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--samples", type=int, default=600, help="samples per client")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--eval", type=int, default=2000)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--scale-clients", type=int, default=10000, help="clients of the scale variant (0: skip)")
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
