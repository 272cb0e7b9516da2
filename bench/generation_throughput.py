"""Generation throughput: the Ray Data actor-pool pipeline (1 and 2 actors) vs a plain loop.

The plain loop constructs the same generator class, calls it on the same prompt table with the same batch
size, with torch limited to the same CPU allotment an actor gets (``generate.num_cpus``, 1 by default), and
writes the same Parquet shards (``ShardWriter``, as the actors do); the Ray runs are ``gptfl generate``'s
shard stage (``write_shards``: the actors write the shards, the driver gets one record per shard).
Generators: ``glyphs`` and ``diffusers`` (a tiny random Stable Diffusion pipeline built offline, or
``--model-id`` for a real one). All numbers come from the same run. Each mode runs twice, on N/4 and on N
samples; printed per generator:
  marginal = (N - N/4) / (T(N) - T(N/4)): samples/s with fixed costs (model load, actor start-up,
             pipeline planning) cancelled out, i.e. the rate a long generation run sustains;
  steady   = the rate between the completion of each worker's first shard and of the last shard, from the
             N-sample run's shard files (start-up left out, in one run: less noisy than marginal, which is
             a difference of two wall times that each include a start-up);
  e2e      = N / T(N): samples/s of the whole call including those fixed costs;
  driver   = the driver process's CPU time / wall time over the N-sample Ray run (how busy the head is).
Targets: Ray with 1 actor >= 0.9× the plain loop, with 2 actors >= 1.7× (steady; marginal printed too). Not a timed test: run on
an otherwise idle machine with at least 2 free cores.

    python bench/generation_throughput.py [--generators glyphs diffusers] [--glyph-samples 8000]
        [--diffusers-samples 512] [--steps 4] [--batch-size 16] [--rows-per-shard N]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gptfl_ray.config import GenerateConfig, PromptsConfig
from gptfl_ray.generate.base import Target
from gptfl_ray.generate.pipeline import SHARDS, ShardWriter, shard_metadata, write_shards
from gptfl_ray.generate.registry import get_generator
from gptfl_ray.prompts.templates import build_prompt_table

REPO = Path(__file__).resolve().parents[1]
DIGITS = [str(i) for i in range(10)]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TARGET = Target("image", image_size=28, channels=1, label_names=tuple(DIGITS), label_text=tuple(WORDS))


def prompt_table(samples: int) -> pa.Table:
    cfg = PromptsConfig(num_per_class=math.ceil(samples / 10))
    table = build_prompt_table(
        cfg, DIGITS, modality="image", label_text=dict(zip(DIGITS, WORDS, strict=True))
    )
    table = table.slice(0, samples)
    return table.append_column("row", pa.array(range(samples), pa.int64()))


def numpy_batch(table: pa.Table) -> dict:
    return {
        name: col.to_numpy(zero_copy_only=False)
        for name, col in zip(table.column_names, table.columns, strict=True)
    }


def plain_loop(cfg: GenerateConfig, table: pa.Table, out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds to construct the generator, call it batch by batch over ``table`` and write the
    shards into ``out``."""
    import torch

    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    t0, c0 = time.perf_counter(), time.process_time()
    gen = get_generator(cfg.generator)(cfg, TARGET)
    rps = cfg.rows_per_shard
    sizes = {k: min(rps, table.num_rows - k * rps) for k in range(math.ceil(table.num_rows / rps))}
    writer = ShardWriter(out, sizes, rps, shard_metadata(cfg, TARGET))
    for start in range(0, table.num_rows, cfg.batch_size):  # batches never cross a shard: rps % batch == 0
        writer.add(gen(numpy_batch(table.slice(start, cfg.batch_size))))
    writer.check_done()
    return time.perf_counter() - t0, time.process_time() - c0


def ray_pipeline(cfg: GenerateConfig, table: pa.Table, out: Path, actors: int) -> tuple[float, float]:
    """(wall, driver CPU) seconds of ``gptfl generate``'s shard stage (same actor pool, the actors write the
    shards into ``out``, the driver gets one record per shard)."""
    cfg = cfg.model_copy(update={"concurrency": actors})
    gen_cls = get_generator(cfg.generator)
    t0, c0 = time.perf_counter(), time.process_time()
    todo = list(range(math.ceil(table.num_rows / cfg.rows_per_shard)))
    infos = write_shards(table, todo, gen_cls, cfg, TARGET, out)
    assert sum(i["rows"] for i in infos) == table.num_rows, (infos, table.num_rows)
    return time.perf_counter() - t0, time.process_time() - c0


def fresh_dir(root: Path) -> Path:
    """An empty folder for one run's shards (the previous run's are deleted)."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return root


def steady_rate(out: Path, workers: int) -> float:
    """Samples/s between the ``workers``-th shard's completion and the last one's, from the shard files'
    modification times (each is renamed into place when complete): start-up and each worker's first shard
    are left out, so the rate is that of workers that are all busy."""
    done = sorted(
        (f.stat().st_mtime_ns, pq.read_metadata(f).num_rows) for f in (out / SHARDS).glob("part-*.parquet")
    )
    if len(done) <= workers:
        return float("nan")
    rows = sum(n for _, n in done[workers:])
    return rows / ((done[-1][0] - done[workers - 1][0]) / 1e9)


def rates(seconds, table: pa.Table, out: Path, workers: int) -> tuple[float, float, float, float]:
    """(marginal, steady, e2e) samples/s from runs on the first quarter of ``table`` and on all of it (the
    steady rate from the full run's shards in ``out``), and the process's CPU share (CPU time / wall) over
    the full run."""
    n_small = max(1, table.num_rows // 4)
    (t_small, _), (t_full, cpu_full) = seconds(table.slice(0, n_small)), seconds(table)
    marginal = (table.num_rows - n_small) / (t_full - t_small) if t_full > t_small else float("nan")
    return marginal, steady_rate(out, workers), table.num_rows / t_full, cpu_full / t_full


def default_rows_per_shard(samples: int, batch_size: int) -> int:
    """``generate.rows_per_shard`` (500), but at least 16 shards in N (4 in N/4, so 2 actors share the
    small run too), in whole batches. A shard is the actors' unit of work."""
    return batch_size * max(1, min(500 // batch_size, samples // 16 // batch_size))


def run(name: str, cfg: GenerateConfig, samples: int, scratch: Path) -> None:
    table = prompt_table(samples)
    out = scratch / "shards"
    # Warm-ups (untimed): imports, font screen and weight cache in this process; Ray's first worker
    # processes (a cold cluster's first actor pool takes ~10 s longer than later ones).
    plain_loop(cfg, table.slice(0, 2 * cfg.batch_size), fresh_dir(out))
    ray_pipeline(cfg, table.slice(0, 4 * cfg.batch_size), fresh_dir(out), 2)
    plain = rates(lambda t: plain_loop(cfg, t, fresh_dir(out)), table, out, 1)
    one = rates(lambda t: ray_pipeline(cfg, t, fresh_dir(out), 1), table, out, 1)
    two = rates(lambda t: ray_pipeline(cfg, t, fresh_dir(out), 2), table, out, 2)
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"\n{name}: {samples} samples, batch {cfg.batch_size}, {cfg.rows_per_shard} rows per shard, "
        f"{cfg.num_cpus:g} CPU per generator"
    )
    print(
        f"  {'':14s} {'marginal/s':>10s} {'steady/s':>9s} {'e2e/s':>8s} {'marginal ×':>11s} "
        f"{'steady ×':>9s} {'e2e ×':>7s} {'driver CPU':>11s}"
    )
    print(f"  {'plain loop':14s} {plain[0]:10.1f} {plain[1]:9.1f} {plain[2]:8.1f}")
    for label, (marginal, steady, e2e, driver) in (("ray, 1 actor", one), ("ray, 2 actors", two)):
        print(
            f"  {label:14s} {marginal:10.1f} {steady:9.1f} {e2e:8.1f} {marginal / plain[0]:11.2f} "
            f"{steady / plain[1]:9.2f} {e2e / plain[2]:7.2f} {driver:10.0%}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--generators", nargs="+", default=["glyphs", "diffusers"], choices=["glyphs", "diffusers"]
    )
    ap.add_argument("--glyph-samples", type=int, default=8000)
    ap.add_argument("--diffusers-samples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4, help="diffusion steps")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--rows-per-shard",
        type=int,
        default=None,
        help="shard size (a multiple of --batch-size); default: 500, or less to give 16 shards per run",
    )
    ap.add_argument(
        "--model-id", default=None, help="diffusers model (default: a tiny random SD built offline)"
    )
    args = ap.parse_args()
    if args.rows_per_shard is not None and (
        args.rows_per_shard <= 0 or args.rows_per_shard % args.batch_size
    ):
        ap.error(f"--rows-per-shard: must be a positive multiple of --batch-size ({args.batch_size})")

    def shard_rows(samples: int) -> int:
        return args.rows_per_shard or default_rows_per_shard(samples, args.batch_size)

    import ray

    tmp = tempfile.mkdtemp(prefix="gb", dir="/tmp")  # private Ray dir: other sessions may run Ray too
    ray.init(
        num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, _temp_dir=tmp, configure_logging=False
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    if "glyphs" in args.generators:
        cfg = GenerateConfig(
            generator="glyphs", batch_size=args.batch_size, rows_per_shard=shard_rows(args.glyph_samples)
        )
        run("glyphs", cfg, args.glyph_samples, Path(tmp))
    if "diffusers" in args.generators:
        model_id = args.model_id
        if model_id is None:
            sys.path.insert(0, str(REPO))
            from tests.tiny_generators import build_tiny_stable_diffusion

            model_id = str(build_tiny_stable_diffusion(Path(tmp) / "tiny-sd"))
        cfg = GenerateConfig(
            generator="diffusers",
            model_id=model_id,
            batch_size=args.batch_size,
            rows_per_shard=shard_rows(args.diffusers_samples),
            options={"num_inference_steps": args.steps},
        )
        run(f"diffusers ({model_id}, {args.steps} steps)", cfg, args.diffusers_samples, Path(tmp))
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
