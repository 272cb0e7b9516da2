"""``audioldm``: text-to-audio with AudioLDM (diffusers), GPT-FL's generator for environmental sound.

Same conventions as the image pipeline: DPM-Solver++ by default, one pipeline call per batch with per-row
guidance scales, a seeded ``torch.Generator`` per sample. Clips are ``audio_length_in_s`` long (default: the task's
clip length) and resampled from the vocoder's rate to the task's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from gptfl_ray.data.audio import resample
from gptfl_ray.generate.base import (
    Generator,
    GeneratorOptions,
    resolve_device,
    resolve_dtype,
    torch_generators,
)
from gptfl_ray.generate.guidance import run_guided
from gptfl_ray.generate.image_diffusers import load_pipeline, use_dpm_solver
from gptfl_ray.generate.registry import register


class AudioLDMOptions(GeneratorOptions):
    num_inference_steps: int = Field(25, gt=0)
    audio_length_in_s: float | None = Field(None, gt=0)  # default: data.audio.clip_seconds
    scheduler: Literal["dpm-solver", "model"] = "dpm-solver"
    negative_prompt: str | None = "low quality, average quality"
    variant: str | None = None


@register
class AudioLDMGenerator(Generator):
    name = "audioldm"
    kind = "audio"
    modality = "audio"
    default_model_id = "cvssp/audioldm-s-full-v2"
    Options = AudioLDMOptions

    def __init__(self, cfg, target):
        super().__init__(cfg, target)
        o: AudioLDMOptions = self.options  # type: ignore[assignment]
        from diffusers import AudioLDMPipeline

        self.device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, self.device)
        self.pipe = load_pipeline(AudioLDMPipeline, self.model_id, dtype, self.device, o.variant)
        if o.scheduler == "dpm-solver":
            use_dpm_solver(self.pipe)
        self.sampling_rate = int(self.pipe.vocoder.config.sampling_rate)
        self.seconds = o.audio_length_in_s or target.clip_seconds or 5.0

    def generate(self, batch):
        o: AudioLDMOptions = self.options  # type: ignore[assignment]
        prompts, seeds = batch["prompt"], batch["seed"]

        def call(scale: float, idx: Any) -> list[Any]:
            return self.pipe(
                prompt=[str(p) for p in prompts[idx]],
                negative_prompt=[o.negative_prompt] * len(idx) if o.negative_prompt else None,
                guidance_scale=scale,
                num_inference_steps=o.num_inference_steps,
                audio_length_in_s=self.seconds,
                generator=torch_generators(seeds[idx], self.device),
                output_type="np",
            ).audios

        clips = run_guided(self.pipe, batch["guidance_scale"], call)
        samples = [resample(w.reshape(-1), self.sampling_rate, self.target.sample_rate) for w in clips]
        meta = [{"steps": o.num_inference_steps, "seconds": self.seconds} for _ in clips]
        return samples, meta
