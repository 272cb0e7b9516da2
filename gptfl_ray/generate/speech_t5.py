"""``speecht5``: SpeechT5 text-to-speech + HiFi-GAN vocoder (transformers), as in GPT-FL's speech tasks.

Speaker identity comes from x-vectors in a local file (``.npy``/``.pt``/``.safetensors``, shape (N, D));
each sample uses a fixed speaker or one drawn from its seed. SpeechT5's decoder pre-net keeps dropout on at
inference (its source of prosody variation), so each sample runs alone under its own torch seed: a
sample never depends on its batch-mates. Output is resampled from the vocoder's rate to the task's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from gptfl_ray.config import ConfigError
from gptfl_ray.data.audio import resample
from gptfl_ray.generate.base import Generator, GeneratorOptions, resolve_device, resolve_dtype
from gptfl_ray.generate.registry import register


class SpeechT5Options(GeneratorOptions):
    vocoder: str = "microsoft/speecht5_hifigan"  # hub id or local path
    speaker_embeddings: str | None = None  # local x-vector file, (N, D) float; required
    speaker: int | Literal["random"] = "random"  # a row of the file, or one drawn per sample
    threshold: float = Field(0.5, gt=0)  # stop when the summed stop-token probabilities reach this
    minlenratio: float = Field(0.0, ge=0)  # min decoder steps per input token
    maxlenratio: float = Field(20.0, gt=0)  # max decoder steps per input token (bounds runaway decoding)


@register
class SpeechT5Generator(Generator):
    name = "speecht5"
    kind = "audio"
    modality = "speech"
    default_model_id = "microsoft/speecht5_tts"
    Options = SpeechT5Options

    def __init__(self, cfg, target):
        super().__init__(cfg, target)
        o: SpeechT5Options = self.options  # type: ignore[assignment]
        import torch
        from transformers import SpeechT5ForTextToSpeech, SpeechT5HifiGan, SpeechT5Processor

        self.device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, self.device)
        self.processor = load_pretrained(SpeechT5Processor, self.model_id, "generate.model_id")
        self.model = load_pretrained(SpeechT5ForTextToSpeech, self.model_id, "generate.model_id", dtype=dtype)
        self.vocoder = load_pretrained(SpeechT5HifiGan, o.vocoder, "generate.options.vocoder", dtype=dtype)
        self.model.to(self.device).eval()
        self.vocoder.to(self.device).eval()
        self.sampling_rate = int(self.vocoder.config.sampling_rate)
        speakers = load_xvectors(o.speaker_embeddings, self.model.config.speaker_embedding_dim)
        if isinstance(o.speaker, int) and not 0 <= o.speaker < len(speakers):
            raise ConfigError(
                f"generate.options.speaker: {o.speaker} out of range (file has {len(speakers)})"
            )
        self.speakers = torch.from_numpy(speakers).to(self.device, dtype)

    def generate(self, batch):
        import torch

        o: SpeechT5Options = self.options  # type: ignore[assignment]
        samples, meta = [], []
        for text, seed in zip(batch["prompt"], batch["seed"], strict=True):
            rng = np.random.default_rng(int(seed))
            spk = o.speaker if isinstance(o.speaker, int) else int(rng.integers(len(self.speakers)))
            inputs = self.processor(text=str(text), return_tensors="pt").to(self.device)
            with (
                torch.random.fork_rng(devices=[self.device] if self.device == "cuda" else []),
                torch.no_grad(),
            ):
                torch.manual_seed(int(seed))
                wav = self.model.generate(
                    inputs["input_ids"],
                    speaker_embeddings=self.speakers[spk : spk + 1],
                    vocoder=self.vocoder,
                    threshold=o.threshold,
                    minlenratio=o.minlenratio,
                    maxlenratio=o.maxlenratio,
                )
            wav = wav.float().cpu().numpy().reshape(-1)
            samples.append(resample(wav, self.sampling_rate, self.target.sample_rate))
            meta.append({"speaker": spk, "text": str(text)})
        return samples, meta


def load_pretrained(cls: Any, model_id: str, field: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` by hub id or local folder; a failure is one line naming the config field."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # weight-loading bars, once per actor, in every log
    looks_local = model_id.startswith((".", "/", "~"))
    if looks_local and not Path(model_id).expanduser().is_dir():
        raise ConfigError(f"{field}: {model_id}: no such model folder")
    try:
        return cls.from_pretrained(str(Path(model_id).expanduser()) if looks_local else model_id, **kwargs)
    except (OSError, ValueError) as err:
        text = str(err).strip()
        raise ConfigError(
            f"{field}: cannot load {model_id!r} ({text.splitlines()[0] if text else type(err).__name__})"
        ) from None


def load_xvectors(path: str | None, dim: int) -> np.ndarray:
    """Speaker x-vectors (N, dim) float32 from ``.npy``, ``.pt`` or ``.safetensors`` (first tensor)."""
    if not path:
        raise ConfigError(
            "generate.options.speaker_embeddings: required: a local file of x-vectors, shape (N, "
            f"{dim}) (e.g. the CMU ARCTIC x-vectors saved with numpy.save)"
        )
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"generate.options.speaker_embeddings: {p}: no such file")
    if p.suffix == ".npy":
        arr = np.load(p)
    elif p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(p))
        arr = next(iter(tensors.values())) if tensors else np.empty((0, dim))
    elif p.suffix in (".pt", ".pth"):
        import torch

        arr = torch.load(p, map_location="cpu", weights_only=True).numpy()
    else:
        raise ConfigError(f"generate.options.speaker_embeddings: {p}: expected .npy, .pt or .safetensors")
    arr = np.asarray(arr, dtype=np.float32)
    arr = arr[None] if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[1] != dim or len(arr) == 0:
        raise ConfigError(
            f"generate.options.speaker_embeddings: {p}: shape {arr.shape}, the model needs (N, {dim})"
        )
    return arr
