"""``transformers`` expansion backend: a causal LM (hub id or local path) in a Ray Data actor, batched.

One ``model.generate`` call per batch: inputs left-padded (decoder-only models continue from the right edge)
with their attention mask (transformers derives position ids from it), new tokens decoded per row.

Seeding contract (temperature > 0): every row samples from its own random stream, a ``torch.Generator``
seeded with the row's ``seed``. ``generate`` runs greedy decoding over logits that :class:`RowSampler` has
warped (temperature, top-k, top-p) and perturbed with Gumbel noise drawn from each row's generator, one
vocabulary-sized draw per step: the argmax of logits + Gumbel noise is an exact sample from the warped
distribution (the Gumbel-max trick), and row i's noise never depends on its batch-mates, the batch size or
the row's position. A row's logits are mathematically independent of its batch (padding is masked), so a
row's text does not depend on how Ray Data formed the batches, up to float rounding of padded matmuls (which
can in principle flip a near-tie); ``gptfl generate`` expands once and keeps the result in
``prompts.parquet``, so a resumed run never re-expands. Temperature 0 is plain batched greedy decoding.
"""

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
    """Loads the causal LM once per actor; ``__call__`` adds a ``raw_expansion`` column to a batch."""

    def __init__(self, cfg: ExpanderConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # weight-loading bars, once per actor, in every log
        self.cfg = cfg
        torch.set_num_threads(max(1, int(cfg.num_cpus)))  # this actor's CPU allotment, not the whole node
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        # Same call for a hub id and a local directory: transformers resolves both in from_pretrained.
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(device).eval()
        tokenizer = self.tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat = has_template if cfg.chat is None else cfg.chat
        if self.chat and not has_template:
            raise ConfigError(
                f"prompts.expander.chat: model {cfg.model!r} has no chat template (set chat: false)"
            )

    def _encode(self, rows: list[dict[str, Any]]) -> Any:
        """The batch's token ids and attention mask, left-padded (as the text-generation pipeline encodes
        one row: the chat template with the generation prompt, or the instruction text)."""
        if self.chat:
            return self.tokenizer.apply_chat_template(
                [chat_messages(self.cfg, r) for r in rows],
                add_generation_prompt=True,
                return_dict=True,
                padding=True,
                return_tensors="pt",
            )
        return self.tokenizer(
            [instruction_text(self.cfg, r) for r in rows], padding=True, return_tensors="pt"
        )

    def generate(self, rows: list[dict[str, Any]]) -> list[str | None]:
        """The new text of each row, from one ``model.generate`` call."""
        import torch
        from transformers import LogitsProcessorList

        if not rows:
            return []
        cfg = self.cfg
        inputs = self._encode(rows).to(self.device)
        kwargs: dict[str, Any] = {"do_sample": False, "max_new_tokens": cfg.max_new_tokens}
        if self.tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        if cfg.temperature > 0:
            seeds = [int(r["seed"]) for r in rows]
            sampler = RowSampler(cfg.temperature, self._top_k(), cfg.top_p, seeds, self.device)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        with torch.no_grad():
            out = self.model.generate(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **kwargs
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        return [_text(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def _top_k(self) -> int:
        """The model's ``generation_config.top_k``, else transformers' default (50), as sampling used it."""
        top_k = self.model.generation_config.top_k
        return 50 if top_k is None else int(top_k)

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch.column_names)
        raw = self.generate(batch.to_pylist())
        if "raw_expansion" in batch.column_names:
            batch = batch.drop_columns(["raw_expansion"])
        return batch.append_column("raw_expansion", pa.array(raw, pa.string()))


class RowSampler:
    """A logits processor: temperature, top-k and top-p warping, then Gumbel noise from each row's own
    generator; greedy decoding of its output samples each row from the warped distribution."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seeds: list[int], device: str):
        import torch
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.warpers: list[Any] = [TemperatureLogitsWarper(temperature)]
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p))
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        for warp in self.warpers:
            scores = warp(input_ids, scores)
        if len(self.generators) != scores.shape[0]:
            raise RuntimeError(
                f"RowSampler: {scores.shape[0]} rows of logits for {len(self.generators)} seeds"
            )
        # float64 uniforms: u == 0 (noise -inf, never picked) has probability 2**-53 per entry.
        u = torch.stack(
            [
                torch.rand(scores.shape[-1], generator=g, dtype=torch.float64, device=scores.device)
                for g in self.generators
            ]
        )
        return scores + (-torch.log(-torch.log(u))).to(scores.dtype)


def _text(text: Any) -> str | None:
    return text if isinstance(text, str) else None
