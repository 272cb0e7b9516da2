"""Generation throughput: the Ray Data actor-pool pipeline (1 and 2 actors) vs a plain loop.

The plain loop constructs the same generator class and calls it on the same prompt table with the same batch
size, with torch limited to the same CPU allotment an actor gets (``generate.num_cpus``, 1 by default).
Generators: ``glyphs`` and ``diffusers`` (a tiny random Stable Diffusion pipeline built offline, or
``--model-id`` for a real one). All numbers come from the same run. Each mode runs twice, on N/4 and on N
samples; printed per generator:
  marginal = (N - N/4) / (T(N) - T(N/4)): samples/s with fixed costs (model load, actor start-up,
             pipeline planning) cancelled out, i.e. the rate a long generation run sustains;
  e2e      = N / T(N): samples/s of the whole call including those fixed costs.
Targets: Ray with 1 actor >= 0.9× the plain loop, with 2 actors >= 1.7× (marginal). Not a timed test: run on
an otherwise idle machine with at least 2 free cores.

    python bench/generation_throughput.py [--generators glyphs diffusers] [--glyph-samples 8000]
        [--diffusers-samples 512] [--steps 4] [--batch-size 16]
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

from gptfl_ray.config import GenerateConfig, PromptsConfig
from gptfl_ray.generate.base import Target
from gptfl_ray.generate.pipeline import generation_dataset, input_blocks
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


def plain_loop(cfg: GenerateConfig, table: pa.Table) -> float:
    """Wall seconds to construct the generator and call it batch by batch over ``table``."""
    import torch

    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    t0 = time.perf_counter()
    gen = get_generator(cfg.generator)(cfg, TARGET)
    rows = 0
    for start in range(0, table.num_rows, cfg.batch_size):
        rows += gen(numpy_batch(table.slice(start, cfg.batch_size))).num_rows
    assert rows == table.num_rows
    return time.perf_counter() - t0


def ray_pipeline(cfg: GenerateConfig, table: pa.Table, actors: int) -> float:
    """Wall seconds of the generation graph of ``gptfl generate`` (same input blocks, same actor pool),
    streamed to the driver."""
    cfg = cfg.model_copy(update={"concurrency": actors})
    gen_cls = get_generator(cfg.generator)
    t0 = time.perf_counter()
    blocks = input_blocks(table, {0: table.num_rows}, table.num_rows, cfg)
    ds = generation_dataset(blocks, gen_cls, cfg, TARGET)
    rows = sum(b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    assert rows == table.num_rows, (rows, table.num_rows)
    return time.perf_counter() - t0


def rates(seconds, table: pa.Table) -> tuple[float, float]:
    """(marginal, e2e) samples/s from runs on the first quarter of ``table`` and on all of it."""
    n_small = max(1, table.num_rows // 4)
    t_small, t_full = seconds(table.slice(0, n_small)), seconds(table)
    marginal = (table.num_rows - n_small) / (t_full - t_small) if t_full > t_small else float("nan")
    return marginal, table.num_rows / t_full


def run(name: str, cfg: GenerateConfig, samples: int) -> None:
    table = prompt_table(samples)
    # Warm-ups (untimed): imports, font screen and weight cache in this process; Ray's first worker
    # processes (a cold cluster's first actor pool takes ~10 s longer than later ones).
    plain_loop(cfg, table.slice(0, 2 * cfg.batch_size))
    ray_pipeline(cfg, table.slice(0, 4 * cfg.batch_size), 2)
    plain = rates(lambda t: plain_loop(cfg, t), table)
    one = rates(lambda t: ray_pipeline(cfg, t, 1), table)
    two = rates(lambda t: ray_pipeline(cfg, t, 2), table)
    print(f"\n{name}: {samples} samples, batch {cfg.batch_size}, {cfg.num_cpus:g} CPU per generator")
    print(f"  {'':14s} {'marginal/s':>10s} {'e2e/s':>8s} {'marginal ×':>11s} {'e2e ×':>7s}")
    print(f"  {'plain loop':14s} {plain[0]:10.1f} {plain[1]:8.1f}")
    for label, (marginal, e2e) in (("ray, 1 actor", one), ("ray, 2 actors", two)):
        print(f"  {label:14s} {marginal:10.1f} {e2e:8.1f} {marginal / plain[0]:11.2f} {e2e / plain[1]:7.2f}")


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
        "--model-id", default=None, help="diffusers model (default: a tiny random SD built offline)"
    )
    args = ap.parse_args()

    import ray

    tmp = tempfile.mkdtemp(prefix="gb", dir="/tmp")  # private Ray dir: other sessions may run Ray too
    ray.init(
        num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, _temp_dir=tmp, configure_logging=False
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    if "glyphs" in args.generators:
        run("glyphs", GenerateConfig(generator="glyphs", batch_size=args.batch_size), args.glyph_samples)
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
            options={"num_inference_steps": args.steps},
        )
        run(f"diffusers ({model_id}, {args.steps} steps)", cfg, args.diffusers_samples)
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
