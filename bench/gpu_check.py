"""One-shot GPU check (issue 14): every model-backed generator on CUDA, and Stable Diffusion 2.1 at scale.

Sections (each timed; a failing one prints one line and the script goes on):

* ``tiny-*``: DiffusersImageGenerator, AudioLDMGenerator, SpeechT5Generator and the transformers prompt
  expander on the tiny random models of tests/tiny_generators.py / tests/tiny_models.py, saved with
  ``save_pretrained`` and loaded by path through the classes' own loading code (device cuda, dtype auto
  = fp16): ok/fail, samples/s, peak GPU memory; the diffusers/AudioLDM sections also check per-row
  guidance in fp16 (each row against a single-scale diffusers call with its scale and seed).
* ``sd21``: an SD-2.1-architecture pipeline with random weights (the real unet/vae/text_encoder configs
  of stabilityai/stable-diffusion-2-1, written below; a tiny CLIP tokenizer padded to 77 tokens), fp16,
  768×768, saved and loaded through DiffusersImageGenerator; images/s of our ``__call__`` on batches with
  mixed guidance scales 1-5 vs the plain diffusers loop (one call, one scale > 1, per-row generators) on
  the same pipeline, and vs the old one-call-per-scale split; peak GPU memory.

Needs torch, transformers, diffusers, pydantic (no Ray). Results: one line per measurement on stdout and
``$OUT/gpu_check.json`` (else a temp file). ``--device cpu --small`` dry-runs everything on a laptop.

    python bench/gpu_check.py                    # on the GPU machine
    python bench/gpu_check.py --device cpu --small
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # gptfl_ray and tests.tiny_* without installing

# stabilityai/stable-diffusion-2-1: unet/config.json, vae/config.json, text_encoder/config.json and
# scheduler/scheduler_config.json (the fields that shape compute; the rest are the classes' defaults).
SD21_UNET = {
    "sample_size": 96,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
    "dual_cross_attention": False,
    "only_cross_attention": False,
}
SD21_VAE = {
    "sample_size": 768,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
}
SD21_TEXT = {  # OpenCLIP ViT-H/14 text tower (penultimate layer: 23 of 24)
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
SD21_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
}
# --small: the same block structure, narrow and shallow, 64×64 (a CPU dry run of the code path).
SMALL_UNET = {
    "sample_size": 8,
    "block_out_channels": [32, 64, 64, 64],
    "attention_head_dim": [2, 4, 4, 4],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
}
SMALL_VAE = {"sample_size": 64, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}
SMALL_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}

WORDS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RESULTS: dict[str, Any] = {"sections": {}}


# ------------------------------------------------------------------------------------------- plumbing
def emit(section: str, **values: Any) -> None:
    """One line per measurement, also kept for the JSON file."""
    RESULTS["sections"].setdefault(section, {}).update(values)
    text = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
    print(f"[{section}] {text}", flush=True)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**30


def reset_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_section(name: str, device: str, fn: Callable[[], None]) -> None:
    """Run one section: reset the GPU peak, time it, catch and report its exception, free memory."""
    reset_peak(device)
    t0 = time.perf_counter()
    try:
        fn()
        status = "ok"
    except Exception as err:  # a failed section must not stop the others
        status = "fail"
        first = (str(err).strip().splitlines() or [""])[0][:300]
        RESULTS["sections"].setdefault(name, {})["traceback"] = traceback.format_exc()
        print(f"[{name}] FAIL {type(err).__name__}: {first}", flush=True)
    emit(name, status=status, elapsed_s=round(time.perf_counter() - t0, 2), peak_gpu_gib=peak_gib(device))
    gc.collect()
    reset_peak(device)


def timed(device: str, fn: Callable[[], Any]) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def rows(n: int, offset: int = 0, scales: list[float] | None = None) -> dict[str, np.ndarray]:
    """A prompt-table batch: prompts over CIFAR-10 words, seeds, guidance scales cycling 1..5."""
    idx = np.arange(offset, offset + n)
    cycle = scales or [1.0, 2.0, 3.0, 4.0, 5.0]
    return {
        "row": idx,
        "label": idx % 10,
        "label_name": np.array([WORDS[i % 10] for i in idx], dtype=object),
        "prompt": np.array([f"a photo of a {WORDS[i % 10]}" for i in idx], dtype=object),
        "seed": idx + 1000,
        "guidance_scale": np.array([cycle[i % len(cycle)] for i in idx], dtype=np.float32),
    }


def count_unet_rows(pipe: Any) -> tuple[list[int], Any]:
    """Rows the UNet computes per forward (one forward per step per pipeline call)."""
    seen: list[int] = []
    handle = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: seen.append(int(a[0].shape[0])))
    return seen, handle


def generators(seeds: np.ndarray, device: str) -> list[Any]:
    import torch

    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def throughput(name: str, device: str, n: int, call: Callable[[int], Any], reps: int = 2) -> float:
    """Warm up once, then ``reps`` timed calls of ``n`` samples; emits and returns samples/s."""
    call(0)
    times = [timed(device, lambda r=r: call(r + 1)) for r in range(reps)]
    rate = n * reps / sum(times)
    emit(name, samples_per_s=rate, batch=n, batch_s=[round(t, 3) for t in times])
    return rate


# ------------------------------------------------------------------------------------------- tiny
def tiny_diffusers(args: argparse.Namespace, tmp: Path) -> None:
    from PIL import Image

    from gptfl_ray.config import GenerateConfig
    from gptfl_ray.generate.base import Target, encode_png, to_task_image
    from gptfl_ray.generate.image_diffusers import DiffusersImageGenerator
    from tests.tiny_generators import build_tiny_stable_diffusion

    path = build_tiny_stable_diffusion(tmp / "tiny-sd")
    cfg = GenerateConfig(
        generator="diffusers", model_id=str(path), device=args.device, options={"num_inference_steps": 4}
    )
    gen = DiffusersImageGenerator(cfg, Target("image", image_size=28, channels=1))
    emit("tiny-diffusers", dtype=str(gen.pipe.unet.dtype).removeprefix("torch."))
    n = 4 if args.small else 32
    seen, handle = count_unet_rows(gen.pipe)
    gen(rows(n))
    handle.remove()
    emit("tiny-diffusers", unet_forwards_per_batch=len(seen), unet_rows_per_forward=seen[0], rows=n)
    throughput("tiny-diffusers", args.device, n, lambda r: gen(rows(n, r * n)))
    # per-row guidance in this dtype: each row against diffusers alone with its scale and seed
    batch = rows(5)
    out = gen(batch)["image"].to_pylist()
    diffs = []
    for i, g in enumerate(batch["guidance_scale"]):
        ref = gen.pipe(
            prompt=[batch["prompt"][i]],
            guidance_scale=float(g),
            num_inference_steps=4,
            generator=generators(batch["seed"][i : i + 1], gen.device),
        ).images[0]
        a = np.asarray(Image.open(io.BytesIO(out[i])), dtype=int)
        b = np.asarray(Image.open(io.BytesIO(encode_png(to_task_image(ref, 28, 1)))), dtype=int)
        diffs.append(int(np.abs(a - b).max()))
    emit("tiny-diffusers", per_row_max_pixel_diff=diffs)


def tiny_audioldm(args: argparse.Namespace, tmp: Path) -> None:
    from gptfl_ray.config import GenerateConfig
    from gptfl_ray.generate.audio_ldm import AudioLDMGenerator
    from gptfl_ray.generate.base import Target
    from tests.tiny_generators import build_tiny_audioldm

    path = build_tiny_audioldm(tmp / "tiny-ldm")
    options = {"num_inference_steps": 4, "audio_length_in_s": 1.0}
    cfg = GenerateConfig(generator="audioldm", model_id=str(path), device=args.device, options=options)
    gen = AudioLDMGenerator(cfg, Target("audio", sample_rate=16000))
    n = 4 if args.small else 32
    seen, handle = count_unet_rows(gen.pipe)
    gen(rows(n))
    handle.remove()
    emit("tiny-audioldm", unet_forwards_per_batch=len(seen), unet_rows_per_forward=seen[0], rows=n)
    throughput("tiny-audioldm", args.device, n, lambda r: gen(rows(n, r * n)))
    batch = rows(5)
    out = gen(batch)["audio"].to_pylist()
    rel = []
    for i, g in enumerate(batch["guidance_scale"]):
        ref = gen.pipe(
            prompt=[batch["prompt"][i]],
            negative_prompt=[gen.options.negative_prompt],
            guidance_scale=float(g),
            num_inference_steps=4,
            audio_length_in_s=1.0,
            generator=generators(batch["seed"][i : i + 1], gen.device),
            output_type="np",
        ).audios[0]
        ref = np.clip(ref, -1, 1)
        rel.append(float(np.abs(np.asarray(out[i]) - ref).max() / max(np.abs(ref).max(), 1e-12)))
    emit("tiny-audioldm", per_row_max_rel_diff=[f"{x:.2e}" for x in rel])


def tiny_speecht5(args: argparse.Namespace, tmp: Path) -> None:
    from gptfl_ray.config import GenerateConfig
    from gptfl_ray.generate.base import Target
    from gptfl_ray.generate.speech_t5 import SpeechT5Generator
    from tests.tiny_generators import build_tiny_speecht5

    model, vocoder, xvectors = build_tiny_speecht5(tmp / "tiny-t5")
    options = {"vocoder": str(vocoder), "speaker_embeddings": str(xvectors), "minlenratio": 1.0}
    cfg = GenerateConfig(generator="speecht5", model_id=str(model), device=args.device, options=options)
    gen = SpeechT5Generator(cfg, Target("speech", sample_rate=16000))
    n = 4 if args.small else 32
    words = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])

    def call(r: int) -> Any:
        b = rows(n, r * n)
        b["prompt"] = words[b["label"]].astype(object)
        return gen(b)

    out = call(0)
    emit("tiny-speecht5", mean_clip_s=float(np.mean([len(w) for w in out["audio"].to_pylist()]) / 16000))
    throughput("tiny-speecht5", args.device, n, call)


def tiny_expander(args: argparse.Namespace, tmp: Path) -> None:
    from gptfl_ray.config import ExpanderConfig, PromptsConfig
    from gptfl_ray.prompts.backend_transformers import TransformersPromptExpander
    from gptfl_ray.prompts.templates import build_prompt_table
    from tests.tiny_models import build_tiny_causal_lm

    # head size 64 (hidden 128, 2 heads), a standard GPU attention shape
    path = build_tiny_causal_lm(tmp / "tiny-lm", hidden_size=128, num_attention_heads=2)
    n = 8 if args.small else 64
    table = build_prompt_table(
        PromptsConfig(num_per_class=n // 4), ["cat", "dog", "ship", "bird"], modality="image", label_text={}
    ).to_pylist()
    cfg = ExpanderConfig(
        backend="transformers", model=str(path), device=args.device, max_new_tokens=24, batch_size=n
    )
    exp = TransformersPromptExpander(cfg)
    emit("tiny-expander", dtype=str(exp.model.dtype).removeprefix("torch."))
    throughput("tiny-expander", args.device, len(table), lambda r: exp.generate(table))
    again = exp.generate(table)
    emit("tiny-expander", deterministic=again == exp.generate(table), rows=len(table))


# ------------------------------------------------------------------------------------------- SD 2.1
def build_sd21(path: Path, device: str, small: bool) -> Path:
    """Random-weight SD-2.1-architecture pipeline, built on ``device`` (fp16 on GPU), saved to ``path``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.tiny_generators import _train_bpe

    unet_cfg = {**SD21_UNET, **(SMALL_UNET if small else {})}
    vae_cfg = {**SD21_VAE, **(SMALL_VAE if small else {})}
    text_cfg = {**SD21_TEXT, **(SMALL_TEXT if small else {})}
    dtype = torch.float16 if device == "cuda" else torch.float32
    vocab, merges = _train_bpe(400, ["<|startoftext|>", "<|endoftext|>"], "</w>")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # ids < 49408
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg).to(dtype)
        vae = AutoencoderKL(**vae_cfg).to(dtype)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg)).to(dtype)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD21_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    params = sum(p.numel() for m in (unet, vae, text_encoder) for p in m.parameters())
    emit("sd21", params_m=round(params / 1e6, 1), saved_gib=round(_size(path) / 2**30, 2))
    return path


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sd21(args: argparse.Namespace, tmp: Path) -> None:

    from gptfl_ray.config import GenerateConfig
    from gptfl_ray.generate.base import Target, encode_png, group_by_guidance, to_task_image
    from gptfl_ray.generate.image_diffusers import DiffusersImageGenerator

    t0 = time.perf_counter()
    path = build_sd21(tmp / "sd21", args.device, args.small)
    emit("sd21", build_s=round(time.perf_counter() - t0, 1))
    gc.collect()  # the build's modules are garbage now
    reset_peak(args.device)
    t0 = time.perf_counter()
    steps, n = (2, 4) if args.small else (args.steps, args.batch)
    cfg = GenerateConfig(
        generator="diffusers", model_id=str(path), device=args.device, options={"num_inference_steps": steps}
    )
    gen = DiffusersImageGenerator(cfg, Target("image", image_size=32, channels=3))
    pipe = gen.pipe
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    emit(
        "sd21",
        load_s=round(time.perf_counter() - t0, 1),
        dtype=str(pipe.unet.dtype).removeprefix("torch."),
        resolution=side,
        steps=steps,
        scheduler=type(pipe.scheduler).__name__,
    )

    def ours(r: int) -> Any:
        return gen(rows(n, r * n))

    def plain(r: int) -> Any:  # the plain diffusers loop: one call, one scale > 1, a generator per image
        b = rows(n, r * n)
        return pipe(
            prompt=[str(p) for p in b["prompt"]],
            guidance_scale=3.0,
            num_inference_steps=steps,
            generator=generators(b["seed"], gen.device),
            output_type="pil",
        ).images

    def grouped(r: int) -> Any:  # before issue 14: one pipeline call per distinct guidance scale
        b = rows(n, r * n)
        out = []
        for scale, idx in group_by_guidance(b["guidance_scale"]):
            images = pipe(
                prompt=[str(p) for p in b["prompt"][idx]],
                guidance_scale=scale,
                num_inference_steps=steps,
                generator=generators(b["seed"][idx], gen.device),
                output_type="pil",
            ).images
            out += [encode_png(to_task_image(img, 32, 3)) for img in images]
        return out

    emit("sd21", load_peak_gpu_gib=peak_gib(args.device))
    reset_peak(args.device)
    seen, handle = count_unet_rows(pipe)
    rate_ours = throughput("sd21-ours", args.device, n, ours)
    handle.remove()
    calls = len(seen) // 3 // steps
    emit("sd21-ours", pipeline_calls_per_batch=calls, unet_rows_per_forward=seen[0], plain_rows=2 * n)
    emit("sd21-ours", peak_gpu_gib=peak_gib(args.device))
    reset_peak(args.device)
    rate_plain = throughput("sd21-plain", args.device, n, plain)
    emit("sd21-plain", peak_gpu_gib=peak_gib(args.device))
    emit("sd21", ours_vs_plain=round(rate_ours / rate_plain, 3), target=">= 1.0")
    if not args.no_grouped:
        t = timed(args.device, lambda: grouped(9))
        emit("sd21-grouped", samples_per_s=n / t, batch=n, batch_s=round(t, 3))
        emit("sd21", ours_vs_grouped=round(rate_ours / (n / t), 3))


# ------------------------------------------------------------------------------------------- main
def environment(args: argparse.Namespace) -> None:
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray_imported": "ray" in sys.modules,
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError as err:
        info["diffusers"] = f"missing ({err})"
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    emit("env", **info)


def quiet_libraries() -> None:
    """Errors only from transformers/diffusers: no progress bars or per-load advice in the output."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        return
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="tiny resolution, batch and steps (CPU dry run)")
    parser.add_argument("--batch", type=int, default=32, help="SD 2.1 batch size")
    parser.add_argument("--steps", type=int, default=20, help="SD 2.1 DPM-Solver steps")
    parser.add_argument("--no-grouped", action="store_true", help="skip the one-call-per-scale SD 2.1 batch")
    parser.add_argument("--only", nargs="*", help="run only these sections")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: torch's on cuda, 1 on cpu)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny models only: any hub access must fail, not hang
    out_dir = Path(os.environ.get("OUT") or tempfile.gettempdir())
    out_file = out_dir / "gpu_check.json"
    start = time.perf_counter()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads or args.device == "cpu":  # tiny ops on a shared CPU: one thread avoids stalls
        torch.set_num_threads(args.threads or 1)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    quiet_libraries()
    RESULTS["args"] = vars(args)
    sections: dict[str, Callable[[argparse.Namespace, Path], None]] = {
        "tiny-diffusers": tiny_diffusers,
        "tiny-audioldm": tiny_audioldm,
        "tiny-speecht5": tiny_speecht5,
        "tiny-expander": tiny_expander,
        "sd21": sd21,
    }
    run_section("env", args.device, lambda: environment(args))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name, fn in sections.items():
            if args.only and name not in args.only:
                continue
            run_section(name, args.device, lambda fn=fn: fn(args, Path(tmp)))
            out_file.write_text(json.dumps(RESULTS, indent=1, default=str))  # partial results survive
    RESULTS["total_s"] = round(time.perf_counter() - start, 1)
    out_file.write_text(json.dumps(RESULTS, indent=1, default=str))
    failed = [k for k, v in RESULTS["sections"].items() if v.get("status") == "fail"]
    print(f"[done] total_s={RESULTS['total_s']} failed={failed or 'none'} json={out_file}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
