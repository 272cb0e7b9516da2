"""``speecht5``: SpeechT5 text-to-speech + HiFi-GAN vocoder (transformers), as in GPT-FL's speech tasks.

Speaker identity comes from x-vectors in a local file (``.npy``/``.pt``/``.safetensors``, shape (N, D));
each sample uses a fixed speaker or one drawn from its seed. Output is resampled from the vocoder's rate to
the task's.

Batching and seeding contract: a batch is one ``model.generate`` call (text right-padded, attention mask
passed) and one batched vocoder call, cut to each row's own length (``return_output_lengths``). The only
randomness is the decoder pre-net's dropout, on at inference (its source of prosody variation); transformers
draws one mask for the whole batch from the global RNG, so here it is replaced by :class:`RowDropout`: row
i's masks come from its own ``torch.Generator`` seeded with the row's ``seed``. A row's random stream is thus
its own, equal to the one-row call under ``torch.manual_seed(seed)``. What batch-mates can still change:
(1) transformers sizes ``minlenratio``/``maxlenratio`` from the padded (longest) input, so a shorter row may be
held longer (minlenratio > 0) or cut later (when it never reaches ``threshold``); (2) the vocoder sees the row's
spectrogram followed by zero frames, so the last samples (within its receptive field) differ; (3) padded
matmuls may round differently. So a sample is a pure function of its row *and its batch*; the pipeline forms
batches deterministically from the prompt table (fixed offsets within each shard), so a resumed run
regenerates bit-identical shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from gptfl_ray.config import ConfigError
from gptfl_ray.data.audio import resample
from gptfl_ray.generate.base import (
    Generator,
    GeneratorOptions,
    resolve_device,
    resolve_dtype,
    torch_generators,
)
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
        self.dropout = RowDropout(self.model.speecht5.decoder.prenet)

    def generate(self, batch):
        import torch

        o: SpeechT5Options = self.options  # type: ignore[assignment]
        texts = [str(t) for t in batch["prompt"]]
        seeds = np.asarray(batch["seed"], dtype=np.int64)
        speakers = [
            o.speaker
            if isinstance(o.speaker, int)
            else int(np.random.default_rng(int(s)).integers(len(self.speakers)))
            for s in seeds
        ]
        inputs = self.processor(text=texts, padding=True, return_tensors="pt").to(self.device)
        with self.dropout.seeded(torch_generators(seeds, self.device)), torch.no_grad():
            waves, lengths = self.model.generate(
                inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                speaker_embeddings=self.speakers[speakers],
                vocoder=self.vocoder,
                threshold=o.threshold,
                minlenratio=o.minlenratio,
                maxlenratio=o.maxlenratio,
                return_output_lengths=True,
            )
        waves = waves.float().cpu().numpy().reshape(len(texts), -1)
        samples = [
            resample(wave[:n], self.sampling_rate, self.target.sample_rate)
            for wave, n in zip(waves, lengths, strict=True)
        ]
        meta = [{"speaker": spk, "text": text} for spk, text in zip(speakers, texts, strict=True)]
        return samples, meta


class RowDropout:
    """SpeechT5's decoder pre-net dropout with one mask per row, each from the row's own generator.

    Replaces ``SpeechT5SpeechDecoderPrenet._consistent_dropout`` on one model instance (transformers draws one
    mask from the global RNG and repeats it over the batch). Same arithmetic as the original, so a one-row
    batch under generator(seed) equals the original under ``torch.manual_seed(seed)``; outside
    :meth:`seeded` the original runs.
    """

    def __init__(self, prenet: Any):
        if not callable(getattr(prenet, "_consistent_dropout", None)):
            import transformers

            raise RuntimeError(
                f"generate: transformers {transformers.__version__}: SpeechT5's decoder pre-net has no "
                "_consistent_dropout; per-row seeding needs updating for this version"
            )
        self.generators: list[Any] | None = None
        self.shared = prenet._consistent_dropout  # transformers' own, used outside ``seeded``
        prenet._consistent_dropout = self

    @contextmanager
    def seeded(self, generators: list[Any]) -> Iterator[None]:
        self.generators = generators
        try:
            yield
        finally:
            self.generators = None

    def __call__(self, inputs_embeds: Any, p: float) -> Any:
        import torch

        gens = self.generators
        if gens is None:
            return self.shared(inputs_embeds, p)
        if len(gens) != inputs_embeds.size(0):
            raise RuntimeError("generate: SpeechT5 pre-net dropout called without one generator per row")
        masks = torch.stack(
            [torch.bernoulli(row, p=p, generator=g) for row, g in zip(inputs_embeds, gens, strict=True)]
        )
        return torch.where(masks == 1, inputs_embeds, 0) * 1 / (1 - p)


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
