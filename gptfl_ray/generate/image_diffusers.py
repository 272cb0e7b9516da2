"""``diffusers``: text-to-image with a diffusers pipeline (default Stable Diffusion 2.1, as in GPT-FL).

DPM-Solver++ (multistep) replaces the model's scheduler by default, so 20-25 steps suffice. Every sample
keeps its own guidance scale (one pipeline call per batch, see ``guidance.py``) and its own seeded
``torch.Generator``; images are resized to the task's resolution and channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from gptfl_ray.config import ConfigError
from gptfl_ray.generate.base import (
    Generator,
    GeneratorOptions,
    encode_png,
    resolve_device,
    resolve_dtype,
    to_task_image,
    torch_generators,
)
from gptfl_ray.generate.guidance import run_guided
from gptfl_ray.generate.registry import register


class DiffusersOptions(GeneratorOptions):
    num_inference_steps: int = Field(25, gt=0)
    scheduler: Literal["dpm-solver", "model"] = "dpm-solver"  # "model": keep the checkpoint's scheduler
    height: int | None = Field(None, gt=0)  # generation size; default: the model's native resolution
    width: int | None = Field(None, gt=0)
    negative_prompt: str | None = None
    variant: str | None = None  # weight file variant on the hub, e.g. "fp16"
    attention_slicing: bool = False  # lower peak memory at some speed cost


@register
class DiffusersImageGenerator(Generator):
    name = "diffusers"
    kind = "image"
    modality = "image"
    default_model_id = "stabilityai/stable-diffusion-2-1"
    Options = DiffusersOptions

    def __init__(self, cfg, target):
        super().__init__(cfg, target)
        o: DiffusersOptions = self.options  # type: ignore[assignment]
        from diffusers import DiffusionPipeline

        self.device = resolve_device(cfg.device)
        self.pipe = load_pipeline(
            DiffusionPipeline, self.model_id, resolve_dtype(cfg.dtype, self.device), self.device, o.variant
        )
        if o.scheduler == "dpm-solver":
            use_dpm_solver(self.pipe)
        if o.attention_slicing:
            self.pipe.enable_attention_slicing()

    def generate(self, batch):
        o: DiffusersOptions = self.options  # type: ignore[assignment]
        size, channels = self.target.image_size, self.target.channels
        assert size is not None
        prompts, seeds = batch["prompt"], batch["seed"]

        def call(scale: float, idx: Any) -> list[Any]:
            return self.pipe(
                prompt=[str(p) for p in prompts[idx]],
                negative_prompt=[o.negative_prompt] * len(idx) if o.negative_prompt else None,
                guidance_scale=scale,
                num_inference_steps=o.num_inference_steps,
                height=o.height,
                width=o.width,
                generator=torch_generators(seeds[idx], self.device),
                output_type="pil",
            ).images

        images = run_guided(self.pipe, batch["guidance_scale"], call)
        samples = [encode_png(to_task_image(img, size, channels)) for img in images]
        meta = [{"steps": o.num_inference_steps, "native_size": list(img.size)} for img in images]
        return samples, meta


# ----------------------------------------------------------------------------------- shared loading
def load_pipeline(
    pipeline_cls: Any, model_id: str, dtype: Any, device: str, variant: str | None = None
) -> Any:
    """``pipeline_cls.from_pretrained`` by hub id or local folder, moved to ``device``; errors name the field."""
    looks_local = model_id.startswith((".", "/", "~")) or Path(model_id).expanduser().exists()
    if looks_local and not (Path(model_id).expanduser() / "model_index.json").is_file():
        raise ConfigError(
            f"generate.model_id: {model_id}: not a diffusers pipeline folder (no model_index.json)"
        )
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # per-component loading bars, once per actor, in every log
    transformers_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"dtype": dtype}
    if variant:
        kwargs["variant"] = variant
    try:
        pipe = pipeline_cls.from_pretrained(
            str(Path(model_id).expanduser()) if looks_local else model_id, **kwargs
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"generate.model_id: cannot load {model_id!r} ({first_line(err)})") from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def use_dpm_solver(pipe: Any) -> None:
    """Swap in DPM-Solver++ (multistep), configured from the checkpoint's own scheduler config."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
