"""What an expansion backend sends to its LLM for one prompt-table row (shared by every backend)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gptfl_ray.config import ExpanderConfig

REQUIRED_COLUMNS = ("label", "label_name", "label_text", "prompt", "seed")


def check_columns(names: list[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"prompt table: missing column(s) {missing} (build it with build_prompt_table)")


def instruction_text(cfg: ExpanderConfig, row: dict[str, Any]) -> str:
    """``cfg.instruction`` filled with the row's template prompt and label text."""
    return cfg.instruction.format(prompt=row["prompt"], label=row["label_text"])


def chat_messages(cfg: ExpanderConfig, row: dict[str, Any]) -> list[dict[str, str]]:
    """OpenAI-format chat for the row: optional system prompt + the instruction as the user turn."""
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return [*messages, {"role": "user", "content": instruction_text(cfg, row)}]
