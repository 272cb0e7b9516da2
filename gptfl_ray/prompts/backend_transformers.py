"""``transformers`` expansion backend: a text-generation pipeline (hub id or local path) in a Ray Data actor."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from gptfl_ray.errors import ConfigError
from gptfl_ray.prompts.instruction import chat_messages, check_columns, instruction_text

if TYPE_CHECKING:
    from gptfl_ray.config import ExpanderConfig

logger = logging.getLogger(__name__)


class TransformersPromptExpander:
    """Loads the causal LM once per actor; ``__call__`` adds a ``raw_expansion`` column to a batch.

    Sampling (temperature > 0) runs row by row after ``torch.manual_seed(row seed)``, so a row's expansion
    does not depend on which batch or actor it landed in; greedy decoding (temperature 0) is batched.
    """

    def __init__(self, cfg: ExpanderConfig):
        import torch
        from transformers import pipeline

        self.cfg = cfg
        torch.set_num_threads(max(1, int(cfg.num_cpus)))  # this actor's CPU allotment, not the whole node
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        # Same call for a hub id and a local directory: transformers resolves both in from_pretrained.
        self.pipe = pipeline("text-generation", model=cfg.model, device=device, dtype=dtype)
        tokenizer = self.pipe.tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat = has_template if cfg.chat is None else cfg.chat
        if self.chat and not has_template:
            raise ConfigError(
                f"prompts.expander.chat: model {cfg.model!r} has no chat template (set chat: false)"
            )

    def _model_input(self, row: dict[str, Any]) -> str | list[dict[str, str]]:
        return chat_messages(self.cfg, row) if self.chat else instruction_text(self.cfg, row)

    def generate(self, rows: list[dict[str, Any]]) -> list[str | None]:
        import torch

        cfg = self.cfg
        inputs = [self._model_input(r) for r in rows]
        common = dict(max_new_tokens=cfg.max_new_tokens, return_full_text=False)
        if cfg.temperature == 0:
            outputs = self.pipe(inputs, do_sample=False, batch_size=len(inputs), **common)
        else:
            outputs = []
            for model_input, row in zip(inputs, rows, strict=True):
                torch.manual_seed(int(row["seed"]))  # seeds CPU and every CUDA device
                outputs.append(
                    self.pipe(
                        model_input, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, **common
                    )
                )
        return [_generated_text(out) for out in outputs]

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch.column_names)
        raw = self.generate(batch.to_pylist())
        if "raw_expansion" in batch.column_names:
            batch = batch.drop_columns(["raw_expansion"])
        return batch.append_column("raw_expansion", pa.array(raw, pa.string()))


def _generated_text(output: Any) -> str | None:
    """The new text of one pipeline result (``[{"generated_text": str}]``)."""
    first = output[0] if isinstance(output, list) and output else output
    text = first.get("generated_text") if isinstance(first, dict) else None
    return text if isinstance(text, str) else None
