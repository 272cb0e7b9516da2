"""``text-llm``: utterances per label written by a language model, through the prompt-expansion backends.

No client of its own: each actor builds one of the existing backends of :mod:`gptfl_ray.prompts`
(``transformers``: a text-generation pipeline loaded by hub id or local path, ``generate.model_id``;
``openai``: any OpenAI-compatible chat-completions endpoint, e.g. ``vllm serve MODEL`` or Ray Serve LLM on
GPUs, at ``options.base_url``) and asks it, per row, for ``options.instruction`` filled with the row's prompt
(the text prompt template, e.g. "Write one line of TV-sitcom dialogue expressing joy.") followed by a style
sentence drawn per attempt from ``options.styles``. Sampling is seeded by the attempt seed (transformers:
``torch.manual_seed``; openai: the request's ``seed``, honoured by vLLM and OpenAI), so a rerun asks for the
same texts. The reply is cleaned to one utterance, length-bounded, de-duplicated within its shard and retried
with the next seed when rejected (:mod:`gptfl_ray.generate.text_common`); a row never gets a template or
invented text in place of a failed generation: after ``max_attempts`` the step fails.

vLLM in-process (``ray.data.llm``) runs only as its own Ray Data stage, which a generator actor cannot host:
for vLLM, serve the model (``vllm serve``) and use ``backend: openai``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from gptfl_ray.config import ConfigError, ExpanderConfig
from gptfl_ray.errors import shorten
from gptfl_ray.generate.registry import register
from gptfl_ray.generate.remote import KEY_FIELD, check_key_rule
from gptfl_ray.generate.text_common import TextGenerator, TextOptions

DEFAULT_INSTRUCTION = "{prompt} Reply with the line only: no speaker name, no quotes, no explanation."
DEFAULT_STYLES = (
    "",
    "Keep it short.",
    "Make it casual, the way friends talk.",
    "Make it a question.",
    "Address the other person by their first name.",
    "Start with a filler word such as 'well', 'oh' or 'um'.",
)


class TextLLMOptions(TextOptions):
    backend: Literal["transformers", "openai"] = "transformers"
    # What the model is asked; placeholders {prompt} (the row's prompt + a style) and {label} (the label text).
    instruction: str = DEFAULT_INSTRUCTION
    system_prompt: str | None = None  # chat models only
    chat: bool | None = None  # transformers: wrap in the chat template; None = when the tokenizer has one
    # A style sentence appended to the prompt, one drawn per attempt; [] = none.
    styles: list[str] = Field(default_factory=lambda: list(DEFAULT_STYLES))
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(0.9, ge=0)  # 0 = greedy: a retry differs only by its style sentence
    top_p: float = Field(0.95, gt=0, le=1)
    max_attempts: int = Field(6, ge=1)
    # openai backend
    api_key_env: str = "OPENAI_API_KEY"
    allow_insecure_http: bool = False
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1 (required for backend openai)
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(2, ge=0)  # HTTP retries per request (timeouts, 408/429/5xx), before a new seed
    max_concurrency: int = Field(8, gt=0)

    @field_validator("instruction")
    @classmethod
    def _check_instruction(cls, value: str) -> str:
        from gptfl_ray.prompts.placeholders import check_placeholders

        check_placeholders([value], allowed={"prompt", "label"}, required="prompt")
        return value

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        if not value.startswith(("http://", "https://")):
            raise PydanticCustomError("url", "must start with http:// or https://")
        return check_key_rule(value, info)  # the remote generator's rule, same field


@register
class TextLLMGenerator(TextGenerator):
    """Utterances written by an LLM through the prompt-expansion backends: see the module docstring."""

    name = "text-llm"
    Options = TextLLMOptions

    @classmethod
    def prompt_modality(cls, options, data_modality):
        o: TextLLMOptions = options
        if o.backend == "openai" and not o.base_url:
            raise ConfigError(f"{KEY_FIELD}: required for backend 'openai' (e.g. http://host:8000/v1)")
        return super().prompt_modality(options, data_modality)

    def __init__(self, cfg, target):
        super().__init__(cfg, target)
        if not cfg.model_id:
            raise ConfigError(
                "generate.model_id: required for generator 'text-llm' (hub id or local path; the model name "
                "at the endpoint for backend openai)"
            )
        self.expander_cfg = expander_config(self.options, cfg)  # type: ignore[arg-type]
        try:
            if self.expander_cfg.backend == "openai":
                from gptfl_ray.prompts.backend_openai import OpenAIPromptExpander

                self.backend: Any = OpenAIPromptExpander(self.expander_cfg)
            else:
                from gptfl_ray.prompts.backend_transformers import TransformersPromptExpander

                self.backend = TransformersPromptExpander(self.expander_cfg)
        except ConfigError as err:  # the backend names its own config section; here they are generate.options
            raise ConfigError(str(err).replace("prompts.expander.", "generate.options.", 1)) from None

    def candidates(self, rows, attempt):
        o: TextLLMOptions = self.options  # type: ignore[assignment]
        asks, styles = [], []
        for row in rows:
            style = ""
            if o.styles:
                style = o.styles[int(np.random.default_rng(int(row["seed"])).integers(len(o.styles)))]
            styles.append(style)
            asks.append({**row, "prompt": f"{row['prompt']} {style}".strip()})
        step = self.cfg.batch_size
        raw: list[str | None] = []
        for start in range(0, len(asks), step):
            raw += self.backend.generate(asks[start : start + step])
        return [
            (text, {"style": style, "raw": shorten(text, 300) if text else text})
            for text, style in zip(raw, styles, strict=True)
        ]


def expander_config(o: TextLLMOptions, cfg: Any) -> ExpanderConfig:
    """The backend's config: the model, sampling and endpoint options; device, dtype and CPUs from
    ``generate``."""
    return ExpanderConfig(
        backend=o.backend,
        model=cfg.model_id,
        base_url=o.base_url,
        api_key_env=o.api_key_env,
        allow_insecure_http=o.allow_insecure_http,
        instruction=o.instruction,
        system_prompt=o.system_prompt,
        chat=o.chat,
        max_new_tokens=o.max_new_tokens,
        temperature=o.temperature,
        top_p=o.top_p,
        timeout_s=o.timeout_s,
        retries=o.retries,
        max_concurrency=o.max_concurrency,
        batch_size=cfg.batch_size,
        num_cpus=max(1.0, cfg.num_cpus),
        device=cfg.device,
        dtype=cfg.dtype,
    )
