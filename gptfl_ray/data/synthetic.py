"""Read the synthetic Parquet shards written by ``gptfl generate``.

``load_synthetic`` returns exactly what a real dataset looks like before ``features.to_tensors`` (uint8
images at the task size, float32 waveforms standardised like real clips, texts as a numpy object array of
``str`` carrying the ``data.text`` settings); ``synthetic_ray_dataset`` streams
model inputs (``x``), labels (``y``) and each sample's stable id (``row``, its prompt-table index) through the
same feature functions, for Ray Train. ``row`` lets a consumer split and shuffle by a seeded hash of the id, so
its result does not depend on the order in which Ray Data happens to produce blocks.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_ray.config import DataConfig, config_hash
from gptfl_ray.data.audio import standardize_clip
from gptfl_ray.data.base import ArrayDataset, get_spec
from gptfl_ray.errors import InputError, InputNotFoundError
from gptfl_ray.io import read_json

MANIFEST = "manifest.json"


def read_manifest(dir: str | Path) -> dict[str, Any]:
    """The folder's manifest; a clear error if the folder is not a finished generation."""
    path = Path(dir) / MANIFEST
    if not path.is_file():
        raise InputNotFoundError(
            f"{dir}: no {MANIFEST}: not a finished synthetic data folder (run or resume `gptfl generate`)"
        )
    manifest = read_json(path)
    if not manifest.get("complete"):
        raise InputError(f"{dir}: {MANIFEST} marks the generation incomplete (resume `gptfl generate`)")
    return manifest


def shard_files(dir: str | Path, manifest: dict[str, Any] | None = None) -> list[Path]:
    manifest = manifest or read_manifest(dir)
    files = [Path(dir) / s for s in manifest["shards"]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise InputNotFoundError(f"{dir}: shard files missing: {', '.join(missing[:3])}")
    return files


def synthetic_identity(dir: str | Path, manifest: dict[str, Any] | None = None) -> str:
    """A hash of what the folder holds (its manifest and every shard's size): the cache key of its consumers."""
    manifest = manifest or read_manifest(dir)
    return config_hash(manifest, [f.stat().st_size for f in shard_files(dir, manifest)])


def row_ids(dir: str | Path, manifest: dict[str, Any] | None = None) -> np.ndarray:
    """Every sample's stable id (the ``row`` column: its prompt-table index), in shard order."""
    import pyarrow.parquet as pq

    files = shard_files(dir, manifest)
    if files and "row" not in pq.read_schema(files[0]).names:
        raise InputError(f"{dir}: shards have no 'row' column (made by an older gptfl generate; regenerate)")
    parts = [pq.read_table(f, columns=["row"])["row"].to_numpy() for f in files]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def _check_task(dir: str | Path, manifest: dict[str, Any], data_cfg: DataConfig) -> str:
    """The sample column to read; errors if the data does not fit the task."""
    spec = get_spec(data_cfg)
    kind = spec.modality if spec.modality in ("image", "text") else "audio"
    if manifest.get("kind", "image" if "image_size" in manifest else "audio") != kind:
        raise InputError(
            f"{dir}: holds {manifest.get('kind')} data but data.dataset {data_cfg.dataset!r} is {kind}"
        )
    return kind


def class_index(manifest: dict[str, Any], data_cfg: DataConfig) -> np.ndarray:
    """Map the folder's label index -> the real dataset's class index, by label name.

    A collected label union may lack classes (or order them differently); the downstream model's classes are the
    dataset's, so synthetic labels are re-indexed by name. Without the dataset's names (unknown dataset files),
    the folder's own order is kept.
    """
    from gptfl_ray.data.registry import label_names
    from gptfl_ray.paths import DataNotFoundError

    names = list(manifest["label_names"])
    try:
        classes = label_names(data_cfg)
    except DataNotFoundError:
        return np.arange(len(names), dtype=np.int64)
    where = {n: i for i, n in enumerate(classes)}
    unknown = [n for n in names if n not in where]
    if unknown:
        raise InputError(
            f"synthetic labels {unknown[:5]} are not classes of data.dataset {data_cfg.dataset!r}"
        )
    return np.array([where[n] for n in names], dtype=np.int64)


def decode_images(pngs: list[bytes], size: int, channels: int) -> np.ndarray:
    """PNG bytes -> uint8 (N, size, size) or (N, size, size, 3); resized (Lanczos) if stored at another size."""
    from PIL import Image

    out = np.empty((len(pngs), size, size) if channels == 1 else (len(pngs), size, size, 3), dtype=np.uint8)
    for i, data in enumerate(pngs):
        img = Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.LANCZOS)
        out[i] = np.asarray(img, dtype=np.uint8)
    return out


def standardize_waves(waves: list[Any], source_rate: int, data_cfg: DataConfig) -> np.ndarray:
    """Raw synthetic waveforms -> float32 (N, T) exactly as real clips are prepared (gptfl_ray.data.audio)."""
    a = data_cfg.audio
    length = round(a.sample_rate * a.clip_seconds)
    out = np.empty((len(waves), length), dtype=np.float32)
    for i, w in enumerate(waves):
        out[i] = standardize_clip(
            np.asarray(w, dtype=np.float32), source_rate, a.sample_rate, a.clip_seconds, a.trim_silence
        )
    return out


def load_synthetic(dir: str | Path, data_cfg: DataConfig) -> ArrayDataset:
    """All synthetic samples in memory, decoded to the task's raw format (labels follow the manifest)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = read_manifest(dir)
    kind = _check_task(dir, manifest, data_cfg)
    files = shard_files(dir, manifest)
    table = pa.concat_tables([pq.read_table(f, columns=[kind, "label"]) for f in files])
    classes = class_index(manifest, data_cfg)
    y = classes[table["label"].to_numpy()]
    names = [""] * (int(classes.max()) + 1 if len(classes) else 0)
    for name, c in zip(manifest["label_names"], classes, strict=True):
        names[c] = name
    if kind == "image":
        spec = get_spec(data_cfg)
        x = decode_images(table["image"].to_pylist(), spec.image_size, spec.channels)
        return ArrayDataset(x=x, y=y, label_names=names, modality="image")
    if kind == "text":
        x = np.array(table["text"].to_pylist(), dtype=object)
        return ArrayDataset(x=x, y=y, label_names=names, modality="text", text=data_cfg.text)
    x = standardize_waves(_audio_lists(table["audio"]), int(manifest["sample_rate"]), data_cfg)
    return ArrayDataset(
        x=x,
        y=y,
        label_names=names,
        modality="audio",
        sample_rate=data_cfg.audio.sample_rate,
    )


def _audio_lists(column: Any) -> list[np.ndarray]:
    """A list<float32> Arrow column -> one numpy array per row (zero-copy slices of the values buffer)."""
    out = []
    for chunk in column.chunks:
        values = chunk.values.to_numpy(zero_copy_only=False)
        offsets = chunk.offsets.to_numpy()
        out += [values[offsets[i] : offsets[i + 1]] for i in range(len(chunk))]
    return out


def _featurize(
    batch: Any,
    data_cfg: DataConfig,
    kind: str,
    source_rate: int | None,
    classes: np.ndarray,
    image_shape: tuple[int, int] | None,
) -> dict[str, np.ndarray]:
    """Ray Data batch function: stored samples -> ``x`` model inputs (same feature code as real data: float32
    images or spectrograms, int64 token ids for text), ``y``, ``row`` (the stable id). ``image_shape`` (size,
    channels) comes from the driver: the workers never read the user's dataset to learn it."""
    from gptfl_ray.data.features import audio_tensor, image_tensor, text_tensor

    rows = batch["row"].to_numpy().astype(np.int64)
    y = classes[batch["label"].to_numpy()]
    if kind == "text":
        ids = text_tensor(batch["text"].to_pylist(), data_cfg.text)
        return {"x": ids.numpy().astype(np.int64, copy=False), "y": y, "row": rows}
    if kind == "image":
        assert image_shape is not None
        raw = decode_images(batch["image"].to_pylist(), *image_shape)
        x = image_tensor(raw, data_cfg.dataset)
    else:
        assert source_rate is not None
        x = audio_tensor(
            standardize_waves(_audio_lists(batch["audio"]), source_rate, data_cfg), data_cfg.audio
        )
    return {"x": x.numpy().astype(np.float32, copy=False), "y": y, "row": rows}


def synthetic_ray_dataset(dir: str | Path, data_cfg: DataConfig) -> Any:
    """A lazy Ray Dataset with ``x`` (model inputs: float32, or int64 token ids for text), ``y`` (int64) and
    ``row`` (int64 stable id).

    Rows come in shard order when the dataset's DataContext preserves order
    (``execution_options.preserve_order``), else in whatever order Ray Data's tasks finish.
    """
    import ray.data

    manifest = read_manifest(dir)
    kind = _check_task(dir, manifest, data_cfg)
    files = [str(f) for f in shard_files(dir, manifest)]
    rate = int(manifest["sample_rate"]) if kind == "audio" else None
    spec = get_spec(data_cfg)
    image_shape = (spec.image_size, spec.channels) if kind == "image" else None
    # Ray 2.60's default parquet reader (DataSourceV2) starts a fresh pool of FooterReader actors for every read to
    # fetch the footers in parallel: new processes (~2 s of CPU each) that cost more than they save on a folder
    # whose manifest already lists its shards (measured: 120 rows in 6 shards, 12.8 s vs 4.3 s for the first read on
    # 2 CPUs). The V1 reader lists the files in the driver and samples a few of them in plain tasks, which run on
    # Ray's pooled worker processes.
    ctx = ray.data.DataContext.get_current()
    saved, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        shards = ray.data.read_parquet(files)
    finally:
        ctx.use_datasource_v2 = saved
    return shards.select_columns([kind, "label", "row"]).map_batches(
        _featurize,
        fn_kwargs={
            "data_cfg": data_cfg,
            "kind": kind,
            "source_rate": rate,
            "classes": class_index(manifest, data_cfg),
            "image_shape": image_shape,
        },
        batch_format="pyarrow",
        batch_size=256,
    )
