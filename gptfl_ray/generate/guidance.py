"""Per-row classifier-free guidance scales in one diffusers pipeline call.

diffusers pipelines take one ``guidance_scale`` per call, so a batch whose rows carry different scales
(the prompt table's 1-5) would need one call per distinct scale: batches of a few images. This is written
by hand because diffusers has no per-row scale. The pipeline is called once with a reference scale
``g0 = max g_i > 1`` (guidance on: the UNet input is ``[uncond rows, cond rows]``), and two hooks on its
UNet make each step's guided prediction row ``i``'s own:

* a forward pre-hook drops the unconditional rows of unguided rows (``g_i <= 1``): diffusers computes no
  unconditional prediction for such a row alone, so neither do we (a batch with scales 1-5 runs ~10 %
  fewer UNet rows than plain diffusers with one scale > 1);
* a forward hook rewrites the output so that the pipeline's own ``u + g0 * (c' - u)`` equals
  ``u + g_i * (c - u)``: ``c' = u + (g_i / g0) * (c - u)``; an unguided row gets ``u = c' = c``, so the
  pipeline returns ``c`` for it, the conditional prediction, as diffusers does (negative prompt ignored).

Noise stays per row (one seeded generator each). Only pipelines known to guide exactly that way on a
UNet output ``[uncond, cond]`` get the hooks; any other falls back to one call per distinct scale.
``guidance_rescale`` (SD/SDXL) must stay 0: it would rescale against the rewritten conditional half (our
generators never pass it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from gptfl_ray.generate.base import group_by_guidance

T = TypeVar("T")

# Pipelines whose denoising step is ``u, c = unet(cat([x, x]), ...).chunk(2); u + g * (c - u)`` with
# guidance on iff ``g > 1``, and whose UNet rows are independent (checked against diffusers 0.42).
PER_ROW_PIPELINES = frozenset({"StableDiffusionPipeline", "StableDiffusionXLPipeline", "AudioLDMPipeline"})


def effective_scales(scales: np.ndarray) -> np.ndarray:
    """The scale each row gets from diffusers: ``g <= 1`` means no guidance, i.e. scale 1."""
    scales = np.asarray(scales, dtype=np.float64)
    return np.where(scales > 1.0, scales, 1.0)


def supports_per_row(pipe: Any) -> bool:
    """True when ``pipe`` guides as :data:`PER_ROW_PIPELINES` do, on a UNet without a guidance embedding."""
    unet = getattr(pipe, "unet", None)
    return (
        type(pipe).__name__ in PER_ROW_PIPELINES
        and unet is not None
        and hasattr(unet, "register_forward_hook")
        and getattr(unet.config, "time_cond_proj_dim", None) is None
    )


def run_guided(pipe: Any, scales: np.ndarray, call: Callable[[float, np.ndarray], list[T]]) -> list[T]:
    """Outputs for every row, in row order. ``call(scale, idx)`` runs the pipeline on rows ``idx`` with
    ``guidance_scale=scale`` and returns one output per row: called once with all rows when ``pipe``
    supports per-row scales (or the rows share one), else once per distinct scale."""
    scales = np.asarray(scales, dtype=np.float32)
    n = len(scales)
    eff = effective_scales(scales)
    if n == 0:
        return []
    if np.all(eff == eff[0]):
        return _checked(call(float(scales[0]), np.arange(n)), n)
    if not supports_per_row(pipe):
        out: list[Any] = [None] * n
        for scale, idx in group_by_guidance(scales):
            for i, value in zip(idx, _checked(call(scale, idx), len(idx)), strict=True):
                out[i] = value
        return out
    g0 = float(eff.max())  # > 1: guidance on for the whole batch
    pre, post = _per_row_hooks(eff, g0)
    handles = [
        pipe.unet.register_forward_pre_hook(pre, with_kwargs=True),
        pipe.unet.register_forward_hook(post, with_kwargs=True),
    ]
    try:
        return _checked(call(g0, np.arange(n)), n)
    finally:
        for handle in handles:
            handle.remove()


def _per_row_hooks(eff: np.ndarray, g0: float) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(pre-hook, hook) for a UNet called on ``[uncond, cond]`` rows; ``eff`` = each row's scale."""
    import torch

    n = len(eff)
    guided = np.flatnonzero(eff > 1.0)  # rows whose unconditional prediction is needed
    skip = len(guided) < n  # the UNet then runs len(guided) + n rows instead of 2n
    keep = np.concatenate([guided, n + np.arange(n)])
    weights = torch.as_tensor(eff / g0, dtype=torch.float32)

    def take(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == 2 * n:
            return value.index_select(0, torch.as_tensor(keep, device=value.device))
        if isinstance(value, dict):
            return {k: take(v) for k, v in value.items()}
        return value

    def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        sample = args[0] if args else kwargs["sample"]
        if sample.shape[0] != 2 * n:
            raise RuntimeError(
                f"per-row guidance: the UNet got a batch of {sample.shape[0]}, expected {2 * n} ([uncond, cond])"
            )
        if not skip:
            return None
        return tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()}

    def post(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        sample = output[0] if isinstance(output, tuple) else output.sample
        out = sample.float()
        c = out[len(guided) :]
        u = c.clone()  # unguided rows: u = c, so c' = c and the pipeline's u + g0 * (c' - u) = c
        u[torch.as_tensor(guided, device=out.device)] = out[: len(guided)]
        w = weights.to(out.device).view(-1, *([1] * (out.ndim - 1)))
        new = torch.cat([u, u + w * (c - u)]).to(sample.dtype)
        if isinstance(output, tuple):
            return (new, *output[1:])
        output.sample = new
        return output

    return pre, post


def _checked(values: list[T], n: int) -> list[T]:
    values = list(values)
    if len(values) != n:
        raise RuntimeError(f"pipeline returned {len(values)} outputs for {n} rows")
    return values
