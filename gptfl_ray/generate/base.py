"""The generator interface: one small class per generator, called on numpy batches of prompt-table rows.

A generator is constructed once per actor (model loaded there), receives a numpy batch of prompt-table
rows and returns a pyarrow table with the synthetic samples plus the provenance columns that end up in the
Parquet shards. Every sample is a function of its row (prompt, guidance scale, seed) and of the batch it is
in (batches are cut at fixed offsets of each shard; for most generators the row alone decides, SpeechT5's
batched decoding is the exception), so a resumed run regenerates exactly what an interrupted one would
have written.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError

from gptfl_ray.config import ConfigError, GenerateConfig, plugin_params_error

# Prompt-table columns copied into every output row (``expansion_fallback`` only when present).
PASSTHROUGH = ("row", "label", "label_name", "prompt", "guidance_scale", "seed", "expansion_fallback")


@dataclass(frozen=True)
class Target:
    """What the task needs: the prompt modality and the sample format of the real data."""

    modality: str  # prompt modality: "image" | "speech" | "audio" | "text"
    image_size: int | None = None  # square side of the task's images
    channels: int = 1
    sample_rate: int | None = None  # Hz of the task's audio
    clip_seconds: float | None = None  # length of the task's audio clips
    label_names: tuple[str, ...] = ()  # the classes, by label index
    label_text: tuple[str, ...] = ()  # their text in prompts (e.g. "seven" for "7"), by label index

    @property
    def kind(self) -> str:
        """Output column: "image" (PNG bytes), "text" (a string) or "audio" (float32 waveform)."""
        return self.modality if self.modality in ("image", "text") else "audio"


class GeneratorOptions(BaseModel):
    """Base of every generator's ``generate.options`` model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Generator:
    """Base class: subclasses set the class attributes and implement :meth:`generate`."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "image" | "audio" | "text"
    modality: ClassVar[str]  # prompt modality it consumes: "image" | "speech" | "audio" | "text"
    # True: the pipeline hands ``generate`` one whole shard per call (text generators de-duplicate within it).
    whole_shards: ClassVar[bool] = False
    default_model_id: ClassVar[str | None] = None
    Options: ClassVar[type[GeneratorOptions]] = GeneratorOptions

    def __init__(self, cfg: GenerateConfig, target: Target):
        if target.kind != self.kind:
            raise ConfigError(
                f"generate.generator: {self.name!r} makes {self.kind} but the task needs {target.kind}"
            )
        self.cfg = cfg
        self.target = target
        self.options = self.parse_options(cfg.options)
        self.model_id = cfg.model_id or self.default_model_id or ""
        _limit_threads_in_actor(cfg.num_cpus)

    # ----------------------------------------------------------------------------- subclass API
    def generate(self, batch: dict[str, np.ndarray]) -> tuple[list[Any], list[dict[str, Any]]]:
        """Samples for the batch (PNG bytes, or float32 waveforms at ``target.sample_rate``) and per-sample
        metadata (font, voice, ...), both in row order."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- shared
    @classmethod
    def prompt_modality(cls, options: GeneratorOptions, data_modality: str) -> str:
        """The prompt modality for a dataset of ``data_modality`` ("image" | "audio" | "text"); errors if it
        cannot make that kind of data."""
        kind = data_modality if data_modality in ("image", "text") else "audio"
        if cls.kind != kind:
            article = "an" if data_modality[:1] in ("a", "i") else "a"
            raise ConfigError(
                f"generate.generator: {cls.name!r} makes {cls.kind} but data.dataset is {article} {data_modality} dataset"
            )
        return cls.modality

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> GeneratorOptions:
        """Validate ``generate.options``; errors name ``generate.options.<key>``."""
        try:
            return cls.Options.model_validate(options or {})
        except ValidationError as err:
            raise plugin_params_error(
                err, "generate.options", "unknown option", f"generator {cls.name!r}"
            ) from None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        samples, meta = self.generate(batch)
        n = len(batch["prompt"])
        if len(samples) != n or len(meta) != n:
            raise RuntimeError(f"generator {self.name!r} returned {len(samples)} samples for {n} rows")
        columns: dict[str, pa.Array] = {}
        for col in PASSTHROUGH:
            if col in batch:
                columns[col] = pa.array(np.asarray(batch[col]), type=ROW_TYPES[col])
        columns["generator"] = pa.array([self.name] * n, type=pa.string())
        columns["model_id"] = pa.array([self.model_id] * n, type=pa.string())
        columns["meta"] = pa.array([json.dumps(m, sort_keys=True) for m in meta], type=pa.string())
        if self.kind == "image":
            columns["image"] = pa.array(samples, type=pa.binary())
        elif self.kind == "text":
            columns["text"] = pa.array(samples, type=pa.string())
        else:
            columns["audio"] = pa.array([clean_audio(s) for s in samples], type=pa.list_(pa.float32()))
        return pa.table(columns)


ROW_TYPES: dict[str, pa.DataType] = {
    "row": pa.int64(),
    "label": pa.int64(),
    "label_name": pa.string(),
    "prompt": pa.string(),
    "guidance_scale": pa.float32(),
    "seed": pa.int64(),
    "expansion_fallback": pa.bool_(),
}


# --------------------------------------------------------------------------------------- helpers
def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def clean_audio(wav: Any) -> np.ndarray:
    """float32 in [-1, 1] (resampling can overshoot a full-scale clip) with denormals flushed to zero
    (resampler tails leave ~1e-24 values that make later float arithmetic very slow)."""
    wav = np.clip(np.asarray(wav, dtype=np.float32).reshape(-1), -1.0, 1.0)
    wav[np.abs(wav) < 1e-20] = 0.0
    return wav


def to_task_image(image: Any, size: int, channels: int) -> np.ndarray:
    """A PIL image -> uint8 pixels at the task's size and channels (Lanczos resize)."""
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("generate.device: 'cuda' requested but no CUDA device is visible")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """``auto`` = float16 on GPU, float32 on CPU (half precision is slow or unsupported on CPU)."""
    import torch

    if dtype == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def torch_generators(seeds: np.ndarray, device: str) -> list[Any]:
    """One seeded ``torch.Generator`` per sample: a sample does not depend on its batch-mates."""
    import torch

    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def group_by_guidance(scales: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """Row indices grouped by guidance scale: pipelines take one scale per call."""
    scales = np.asarray(scales, dtype=np.float32)
    return [(float(s), np.flatnonzero(scales == s)) for s in np.unique(scales)]


def _limit_threads_in_actor(num_cpus: float) -> None:
    """Inside a Ray worker, size torch's intra-op pool to the actor's CPU allotment (not the node's)."""
    if "ray" not in sys.modules:  # not in a Ray worker (and Ray may not be installed: bench/gpu_check.py)
        return
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))
