"""Step 2: prompt table -> (LLM expansion) -> generator actor pool (Ray Data) -> Parquet shards + manifest.

Folder layout (``out_dir``)::

    generation.json         what this folder is being filled with (config hash, labels, shard plan)
    prompts.parquet         the expanded prompt table, one row per sample (``row`` = its global index)
    shards/part-00000.parquet ...   rows [k·rows_per_shard, (k+1)·rows_per_shard), sorted by ``row``
    manifest.json           written last: counts per class, config hash, fallbacks, "complete": true

A shard file exists only when complete and on disk (``io.atomic_path``: temp file, fsync, rename, fsync of the
folder; so after a power loss a shard is whole or absent, never empty), and every sample is a pure function of its
prompt-table row, so an interrupted run is resumed by generating only the missing shards.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gptfl_ray.config import GenerateConfig, RunConfig, config_hash
from gptfl_ray.console import eta
from gptfl_ray.data.base import get_spec
from gptfl_ray.errors import ConfigError, InputError, InputNotFoundError
from gptfl_ray.generate.base import Generator, Target
from gptfl_ray.generate.registry import get_generator
from gptfl_ray.io import atomic_path, atomic_write_json, read_json
from gptfl_ray.ray_env import ensure_ray, ray_for

log = logging.getLogger(__name__)

STATE = "generation.json"
PROMPTS = "prompts.parquet"
SHARDS = "shards"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------- public API
def synthetic_hash(cfg: RunConfig) -> str:
    """Identifies a synthetic dataset: dataset, labels, prompts and generator sections (for the user's data,
    also where it is and its image size: its labels and shape come from it)."""
    data: Any = cfg.data.dataset
    if get_spec(cfg.data.dataset).from_data:
        data = [data, cfg.data.model_dump(mode="json", include={"root", "image_size", "hf"})]
    return config_hash(data, cfg.labels, cfg.prompts, cfg.generate)


def generate(
    cfg: RunConfig, out_dir: Path, *, label_names: list[str] | None = None, data_dir: str | Path | None = None
) -> dict[str, Any]:
    """Generate (or finish generating) the synthetic dataset in ``out_dir``; returns the manifest."""
    out_dir = Path(out_dir)
    gen_cls = get_generator(cfg.generate.generator)
    options = gen_cls.parse_options(cfg.generate.options)  # fail fast, before Ray starts
    names = resolve_label_names(cfg, label_names, data_dir)
    target = task_target(cfg, gen_cls, options, names)
    chash = synthetic_hash(cfg)
    done = _complete_manifest(out_dir, chash, names)
    if done is not None:
        log.info("generate: %s already complete (%d samples)", out_dir, done["num_rows"])
        return done
    _claim(out_dir, cfg, chash, names)

    table = _prompt_table(cfg, out_dir, names, target, data_dir)
    rps = cfg.generate.rows_per_shard
    num_shards = math.ceil(table.num_rows / rps)
    finished = finished_shards(out_dir, table.num_rows, rps)
    todo = [k for k in range(num_shards) if k not in finished]
    if todo:
        log.info(
            "generate: %d of %d shards to make with %r (%d actors)",
            len(todo),
            num_shards,
            cfg.generate.generator,
            cfg.generate.concurrency,
        )
        _generate_shards(cfg, gen_cls, target, table, todo, out_dir)
    manifest = _manifest(cfg, gen_cls, target, table, out_dir, chash, names)
    atomic_write_json(out_dir / MANIFEST, manifest)
    log.info("generate: wrote %d samples in %d shards to %s", manifest["num_rows"], num_shards, out_dir)
    return manifest


def generate_command(args: Any) -> int:
    """``gptfl generate CONFIG [--output DIR] [--labels labels.json]``."""
    cfg: RunConfig = args.cfg
    names = read_labels_file(args.labels) if getattr(args, "labels", None) else None
    out = (
        Path(args.output)
        if getattr(args, "output", None)
        else Path(cfg.output_dir) / f"synthetic-{synthetic_hash(cfg)}"
    )
    with ray_for(cfg.ray_address, announce=True):
        manifest = generate(cfg, out, label_names=names, data_dir=getattr(args, "data_dir", None))
    counts = ", ".join(
        f"{n}: {c}" for n, c in zip(manifest["label_names"], manifest["counts_per_class"], strict=True)
    )
    print(f"{out}: {manifest['num_rows']} samples ({counts}); {manifest['fallbacks']} prompt fallbacks")
    return 0


def read_labels_file(path: str | Path) -> list[str]:
    """``{"labels": [...]}`` written by ``gptfl collect-labels``."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: labels file not found")
    try:
        labels = json.loads(path.read_text()).get("labels")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise InputError(f'{path}: not a labels file (expected JSON {{"labels": [...]}})') from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise InputError(f'{path}: "labels" must be a non-empty list of strings')
    return labels


# ------------------------------------------------------------------------------------------ planning
def resolve_label_names(cfg: RunConfig, label_names: list[str] | None, data_dir: Any) -> list[str]:
    """Given names (e.g. the collected label union), else the dataset's. A collected union that equals the
    dataset's label set is put in the dataset's order, so label indices match the real data."""
    from gptfl_ray.data.registry import label_names as dataset_label_names

    if label_names is None:
        return dataset_label_names(cfg.data, data_dir)
    names = list(label_names)
    spec = get_spec(cfg.data, data_dir)
    if spec.label_names and set(names) == set(spec.label_names):
        names = list(spec.label_names)
    return names


def task_target(cfg: RunConfig, gen_cls: type[Generator], options: Any, names: list[str]) -> Target:
    """Prompt modality and sample format: the dataset's image size/channels or the audio config's rate."""
    spec = get_spec(cfg.data, cfg.data_dir)
    modality = gen_cls.prompt_modality(options, spec.modality)
    label_text = {**spec.label_text, **cfg.labels.text}
    common = {"label_names": tuple(names), "label_text": tuple(label_text.get(n, n) for n in names)}
    if spec.modality == "image":
        return Target(modality, image_size=spec.image_size, channels=spec.channels, **common)
    audio = cfg.data.audio
    return Target(modality, sample_rate=audio.sample_rate, clip_seconds=audio.clip_seconds, **common)


def _class_counts(cfg: RunConfig, names: list[str], data_dir: Any) -> list[int] | None:
    """The real per-class counts, loaded only when ``prompts.scale`` needs them."""
    if cfg.prompts.num_per_class is not None or cfg.prompts.scale is None:
        return None
    from gptfl_ray.data.registry import load_dataset

    train = load_dataset(cfg.data, data_dir).train
    counts = dict(zip(train.label_names, train.class_counts().tolist(), strict=True))
    unknown = [n for n in names if n not in counts]
    if unknown:
        raise ConfigError(f"prompts.scale: labels {unknown} are not classes of {cfg.data.dataset}")
    return [counts[n] for n in names]


def _prompt_table(cfg: RunConfig, out_dir: Path, names: list[str], target: Target, data_dir: Any) -> pa.Table:
    """The expanded prompt table with a ``row`` column, built once and kept in ``prompts.parquet``."""
    path = out_dir / PROMPTS
    if path.is_file():
        return pq.read_table(path)
    from gptfl_ray.prompts.templates import build_prompt_table

    label_text = dict(zip(names, target.label_text, strict=True))
    table = build_prompt_table(
        cfg.prompts,
        names,
        modality=target.modality,
        label_text=label_text,
        class_counts=_class_counts(cfg, names, data_dir),
    )
    table = _expand(table, cfg, target.modality)
    table = table.sort_by([("label", "ascending"), ("index", "ascending")])
    table = table.append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return table


def _expand(table: pa.Table, cfg: RunConfig, modality: str) -> pa.Table:
    import ray

    from gptfl_ray.prompts.expand import FALLBACK_COLUMN, expand_prompts
    from gptfl_ray.validate import check_expander_fits

    check_expander_fits(cfg, modality)
    if cfg.prompts.expander.backend == "templates":
        # Identity expansion (what expand_prompts does for "templates"), without a Ray Data job's
        # fixed start-up cost.
        return table.append_column(FALLBACK_COLUMN, pa.array(np.zeros(table.num_rows, dtype=bool)))
    ensure_ray(cfg.ray_address)
    expanded = expand_prompts(ray.data.from_arrow(table), cfg.prompts.expander)
    parts = [t for t in ray.get(expanded.to_arrow_refs()) if t.num_rows]
    out = pa.concat_tables(parts, promote_options="default")
    if out.num_rows != table.num_rows:
        raise RuntimeError(f"prompt expansion returned {out.num_rows} rows for {table.num_rows}")
    return out


def _claim(out_dir: Path, cfg: RunConfig, chash: str, names: list[str]) -> None:
    """Record what this folder holds; refuse to mix shards of another config into it (a claim with no
    prompts or shards yet, e.g. left by a config error, is simply replaced)."""
    state = {
        "format": FORMAT_VERSION,
        "config_hash": chash,
        "label_names": names,
        "generator": cfg.generate.generator,
        "rows_per_shard": cfg.generate.rows_per_shard,
    }
    path = out_dir / STATE
    started = (out_dir / PROMPTS).is_file() or any((out_dir / SHARDS).glob("part-*.parquet"))
    if path.is_file() and started:
        old = read_json(path)
        if old.get("config_hash") != chash or old.get("label_names") != names:
            raise InputError(
                f"{out_dir}: holds a generation for another config or label set (config hash "
                f"{old.get('config_hash')}, now {chash}); use another --output or delete the folder"
            )
        return
    atomic_write_json(path, state)


def _complete_manifest(out_dir: Path, chash: str, names: list[str]) -> dict[str, Any] | None:
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path)
    if manifest.get("config_hash") != chash or manifest.get("label_names") != names:
        raise InputError(
            f"{out_dir}: holds synthetic data for another config or label set (config hash "
            f"{manifest.get('config_hash')}, now {chash}); use another --output or delete the folder"
        )
    return manifest if manifest.get("complete") else None


# ------------------------------------------------------------------------------------------- shards
def shard_path(out_dir: Path, k: int) -> Path:
    return Path(out_dir) / SHARDS / f"part-{k:05d}.parquet"


def shard_sizes(num_rows: int, rows_per_shard: int) -> list[int]:
    n = math.ceil(num_rows / rows_per_shard)
    return [min(rows_per_shard, num_rows - k * rows_per_shard) for k in range(n)]


def finished_shards(out_dir: Path, num_rows: int, rows_per_shard: int) -> set[int]:
    """Shards already on disk with their full row count; leftovers of killed writes are removed."""
    shard_dir = Path(out_dir) / SHARDS
    if not shard_dir.is_dir():
        return set()
    for stale in shard_dir.glob(".part-*.tmp"):
        stale.unlink(missing_ok=True)
    done = set()
    for k, size in enumerate(shard_sizes(num_rows, rows_per_shard)):
        path = shard_path(out_dir, k)
        if path.is_file():
            try:
                if pq.ParquetFile(path).metadata.num_rows == size:
                    done.add(k)
                    continue
            except (pa.ArrowInvalid, OSError):
                pass
            log.warning("generate: %s is unreadable or has the wrong row count; regenerating it", path)
    return done


class ShardWriter:
    """Collects generated rows (arriving in any order) and writes each shard once all its rows are in."""

    def __init__(self, out_dir: Path, sizes: dict[int, int], rows_per_shard: int, metadata: dict[str, str]):
        self.out_dir = Path(out_dir)
        self.sizes = sizes
        self.rps = rows_per_shard
        self.metadata = {k.encode(): v.encode() for k, v in metadata.items()}
        self.pending: dict[int, list[pa.Table]] = {}
        self.counts: dict[int, int] = {}
        self.written: list[int] = []
        self.started = time.perf_counter()  # for each shard line's ETA

    def add(self, table: pa.Table) -> None:
        shard = pc.divide(table["row"], pa.scalar(self.rps, pa.int64())).to_numpy()
        for k in np.unique(shard):
            k = int(k)
            if k not in self.sizes:
                raise RuntimeError(f"generate: got rows of shard {k}, which was not scheduled")
            part = table.filter(pa.array(shard == k))
            self.pending.setdefault(k, []).append(part)
            self.counts[k] = self.counts.get(k, 0) + part.num_rows
            if self.counts[k] == self.sizes[k]:
                self._write(k)
            elif self.counts[k] > self.sizes[k]:
                raise RuntimeError(f"generate: shard {k} got {self.counts[k]} rows, expected {self.sizes[k]}")

    def _write(self, k: int) -> None:
        table = pa.concat_tables(self.pending.pop(k)).sort_by("row")
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **self.metadata})
        path = shard_path(self.out_dir, k)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        self.written.append(k)
        log.info(
            "generate: wrote %s (%d rows; %d/%d this run) %s",
            path.name,
            table.num_rows,
            len(self.written),
            len(self.sizes),
            eta(len(self.written), len(self.sizes), time.perf_counter() - self.started),
        )

    def check_done(self) -> None:
        missing = sorted(set(self.sizes) - set(self.written))
        if missing:
            raise RuntimeError(f"generate: shards {missing} did not receive all their rows")


BLOCKS_PER_ACTOR = (
    8  # input blocks per actor: enough to balance the pool, few enough to keep task overhead low
)


def input_blocks(
    table: pa.Table, sizes: dict[int, int], rows_per_shard: int, g: GenerateConfig
) -> list[pa.Table]:
    """The rows of the scheduled shards cut into blocks: whole batches, never across a shard boundary."""
    total = sum(sizes.values())
    batches = math.ceil(total / (BLOCKS_PER_ACTOR * g.concurrency * g.batch_size))
    block = g.batch_size * max(1, min(max(1, rows_per_shard // g.batch_size), batches))
    return [
        table.slice(k * rows_per_shard + start, min(block, sizes[k] - start))
        for k in sorted(sizes)
        for start in range(0, sizes[k], block)
    ]


def generation_dataset(
    blocks: list[pa.Table], gen_cls: type[Generator], g: GenerateConfig, target: Target
) -> Any:
    """The Ray Data graph: prompt rows -> ``gen_cls`` in a pool of ``g.concurrency`` actors (operator
    ``MapBatches(<generator class>)``), each with ``g.num_cpus`` CPUs and ``g.num_gpus`` GPUs."""
    import ray

    return ray.data.from_arrow(blocks).map_batches(
        gen_cls,
        fn_constructor_kwargs={"cfg": g, "target": target},
        batch_size=g.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=g.concurrency),
        num_cpus=g.num_cpus,
        num_gpus=g.num_gpus or None,
    )


def _generate_shards(
    cfg: RunConfig, gen_cls: type[Generator], target: Target, table: pa.Table, todo: list[int], out_dir: Path
) -> None:
    g = cfg.generate
    rps = g.rows_per_shard
    sizes = {k: min(rps, table.num_rows - k * rps) for k in todo}
    ensure_ray(cfg.ray_address)
    ds = generation_dataset(input_blocks(table, sizes, rps, g), gen_cls, g, target)
    metadata = {"gptfl.generator": g.generator, "gptfl.kind": target.kind}
    if target.sample_rate:
        metadata["gptfl.sample_rate"] = str(target.sample_rate)
    writer = ShardWriter(out_dir, sizes, rps, metadata)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        writer.add(batch)
    writer.check_done()


# ------------------------------------------------------------------------------------------ manifest
def _manifest(
    cfg: RunConfig,
    gen_cls: type[Generator],
    target: Target,
    table: pa.Table,
    out_dir: Path,
    chash: str,
    names: list[str],
) -> dict[str, Any]:
    files = [
        shard_path(out_dir, k) for k in range(len(shard_sizes(table.num_rows, cfg.generate.rows_per_shard)))
    ]
    labels = pa.concat_tables([pq.read_table(f, columns=["label"]) for f in files])["label"].to_numpy()
    counts = np.bincount(labels, minlength=len(names)).tolist()
    expected = np.bincount(table["label"].to_numpy(), minlength=len(names)).tolist()
    if counts != expected:
        raise RuntimeError(f"{out_dir}: shards hold {counts} samples per class, the prompt table {expected}")
    fallbacks = 0
    if "expansion_fallback" in table.column_names:
        fallbacks = int(np.sum(table["expansion_fallback"].to_numpy(zero_copy_only=False)))
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "num_rows": int(table.num_rows),
        "counts_per_class": counts,
        "label_names": names,
        "label_text": list(target.label_text),
        "modality": target.modality,
        "kind": target.kind,
        "dataset": cfg.data.dataset,
        "generator": cfg.generate.generator,
        "model_id": cfg.generate.model_id or gen_cls.default_model_id or "",
        "config_hash": chash,
        "rows_per_shard": cfg.generate.rows_per_shard,
        "shards": [f.relative_to(out_dir).as_posix() for f in files],
        "fallbacks": fallbacks,
    }
    if target.kind == "image":
        manifest.update(image_size=target.image_size, channels=target.channels)
    else:
        manifest.update(sample_rate=target.sample_rate)
    manifest["complete"] = True
    return manifest
