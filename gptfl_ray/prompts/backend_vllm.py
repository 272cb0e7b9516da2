"""``vllm`` expansion backend: Ray Data LLM (``ray.data.llm``) with vLLM engine actors on GPUs.

vLLM pins its own torch and transformers, so this stage runs in its own Ray ``runtime_env`` or container image
(``prompts.expander.runtime_env``, passed to every stage of the processor; see cluster/ for the image). The
processor's stages are: chat template (when ``chat``) -> tokenize -> vLLM engine -> detokenize. Rows whose
inference fails are kept (``should_continue_on_error``) and fall back to their template prompt.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from gptfl_ray.errors import ConfigError

if TYPE_CHECKING:
    import ray.data

    from gptfl_ray.config import ExpanderConfig

ERROR_COLUMN = "__inference_error__"


def _processor_api() -> tuple[Any, Any]:
    """(vLLMEngineProcessorConfig, build_processor) from ray.data.llm; older Ray named it build_llm_processor."""
    try:
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    except ImportError:
        try:
            from ray.data.llm import build_llm_processor as build_processor
            from ray.data.llm import vLLMEngineProcessorConfig
        except ImportError as err:
            raise ConfigError(
                f"prompts.expander.backend: 'vllm' needs ray.data.llm (ray[llm] >= 2.44): {err}"
            ) from None
    return vLLMEngineProcessorConfig, build_processor


def processor_config(cfg: ExpanderConfig) -> Any:
    """The ``vLLMEngineProcessorConfig`` for ``cfg`` (field names differ across Ray versions)."""
    config_cls, _ = _processor_api()
    fields = config_cls.model_fields
    chat = True if cfg.chat is None else cfg.chat
    kwargs: dict[str, Any] = dict(
        model_source=cfg.model,
        engine_kwargs=dict(cfg.engine_kwargs),
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        runtime_env=cfg.runtime_env,
        accelerator_type=cfg.accelerator_type,
    )
    if "chat_template_stage" in fields:  # Ray >= 2.5x: per-stage configs
        kwargs.update(chat_template_stage=chat, tokenize_stage=True, detokenize_stage=True)
    else:  # older Ray: boolean switches
        kwargs.update(apply_chat_template=chat, tokenize=True, detokenize=True)
    if "should_continue_on_error" in fields:
        kwargs["should_continue_on_error"] = True
    return config_cls(**kwargs)


def preprocess_row(row: dict[str, Any], *, cfg: ExpanderConfig, chat: bool) -> dict[str, Any]:
    """Adds the engine's inputs; the template prompt is kept as ``template_prompt`` (stages overwrite
    ``prompt`` with the rendered chat)."""
    from gptfl_ray.prompts.instruction import chat_messages, instruction_text

    sampling: dict[str, Any] = dict(
        temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens
    )
    if cfg.temperature > 0:
        sampling["seed"] = int(row["seed"])  # vLLM seeds each request: reproducible per row
    out: dict[str, Any] = {"template_prompt": row["prompt"], "sampling_params": sampling}
    if chat:
        out["messages"] = chat_messages(cfg, row)
    else:
        out["prompt"] = instruction_text(cfg, row)
    return out


def engine_output(row: dict[str, Any], *, columns: list[str]) -> dict[str, Any]:
    """The processor's postprocess: drop the engine's intermediate fields (messages, token ids, ...)."""
    out = {c: row[c] for c in columns if c != "prompt"}
    out.update(template_prompt=row["template_prompt"], generated_text=row.get("generated_text"))
    return out


def postprocess_row(row: dict[str, Any], *, columns: list[str]) -> dict[str, Any]:
    """Back to the prompt-table columns + ``raw_expansion`` (+ ``expansion_error``: the engine's error), for
    successful rows (``engine_output``) and for error rows, which bypass the processor's postprocess with all
    their fields."""
    from gptfl_ray.errors import shorten
    from gptfl_ray.prompts.expand import RAW_COLUMN, REASON_COLUMN

    error = row.get(ERROR_COLUMN)
    out = {c: row[c] for c in columns if c not in ("prompt", RAW_COLUMN, REASON_COLUMN)}
    out["prompt"] = row["template_prompt"]
    text = None if error else row.get("generated_text")
    out[RAW_COLUMN] = text if isinstance(text, str) else None
    out[REASON_COLUMN] = shorten(" ".join(str(error).split()), 120) if error else None
    return out


def build_vllm_processor(cfg: ExpanderConfig, columns: list[str]) -> Any:
    """The ray.data.llm processor (lazy: nothing runs until the dataset executes)."""
    _, build_processor = _processor_api()
    chat = True if cfg.chat is None else cfg.chat
    return build_processor(
        processor_config(cfg),
        preprocess=functools.partial(preprocess_row, cfg=cfg, chat=chat),
        postprocess=functools.partial(engine_output, columns=columns),
    )


def vllm_raw_expansions(ds: ray.data.Dataset, cfg: ExpanderConfig) -> ray.data.Dataset:
    """``ds`` + ``raw_expansion`` from vLLM (None where inference failed)."""
    columns = list(ds.columns())
    processor = build_vllm_processor(cfg, columns)
    return processor(ds).map(postprocess_row, fn_kwargs={"columns": columns})
