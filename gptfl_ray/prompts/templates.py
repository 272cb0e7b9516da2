"""The prompt table: label names -> one row per synthetic sample (prompt, seed, guidance scale).

Every value in a row is a pure function of (``prompts.seed``, class name, sample index), so any subset of the
table can be regenerated bit-for-bit (a resumed or sharded generation step gets the same seeds).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from gptfl_ray.errors import ConfigError
from gptfl_ray.prompts.placeholders import check_placeholders

if TYPE_CHECKING:
    from gptfl_ray.config import PromptsConfig

# Per modality: the official GPT-FL prompts ("a photo of ..." for images, the bare word for TTS speech,
# "a sound of ..." for AudioLDM), plus a domain variant used when ``prompts.domain`` is set. Text prompts are
# the instruction a text generator's LLM gets (``text-llm``); ``text-grammar`` keeps them as provenance only.
DEFAULT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "image": ("a photo of a {label}",),
    "speech": ("{label}",),
    "audio": ("a sound of {label}",),
    "text": ("Write one line of dialogue expressing {label}.",),
}
DOMAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "image": ("a {domain} of {label}",),  # official multi-domain: photo, drawing, painting, sketch, ...
    "speech": (),  # the TTS says the prompt verbatim: a domain word would change the spoken label
    "audio": ("{label} {domain}",),  # official multi-domain: "in a studio", "in the field", ...
    "text": ("Write one line of {domain} dialogue expressing {label}.",),  # e.g. "TV-sitcom", "workplace"
}
MODALITIES = tuple(DEFAULT_TEMPLATES)

PROMPT_SCHEMA = pa.schema(
    [
        ("label", pa.int64()),  # class index = position in label_names
        ("label_name", pa.string()),
        ("label_text", pa.string()),  # what the prompt says for the class (labels.text mapping)
        ("index", pa.int64()),  # sample index within its class
        ("prompt", pa.string()),
        ("guidance_scale", pa.float32()),
        ("seed", pa.int64()),  # per-sample generator seed, in [0, 2**63)
        ("template", pa.string()),
    ]
)


def default_templates(modality: str, domain: str | list[str] | None) -> list[str]:
    """Templates used when ``prompts.templates`` is unset."""
    if modality not in DEFAULT_TEMPLATES:
        raise ValueError(f"modality: unknown {modality!r} (expected one of {', '.join(MODALITIES)})")
    return list(DEFAULT_TEMPLATES[modality] + (DOMAIN_TEMPLATES[modality] if domain else ()))


def samples_per_class(cfg: PromptsConfig, num_classes: int, class_counts: list[int] | None) -> list[int]:
    """``num_per_class`` for every class, else ``round(scale × class_counts[c])`` (at least 1)."""
    if cfg.num_per_class is not None:
        return [cfg.num_per_class] * num_classes
    if cfg.scale is None:
        raise ConfigError("prompts.num_per_class: set it (or prompts.scale with the real class counts)")
    if class_counts is None:
        raise ValueError("prompts.scale: needs the real dataset's per-class counts (class_counts)")
    if len(class_counts) != num_classes:
        raise ValueError(
            f"prompts.scale: class_counts has {len(class_counts)} entries for {num_classes} labels"
        )
    if any(c < 0 for c in class_counts):
        raise ValueError("prompts.scale: class_counts must be >= 0")
    return [max(1, round(cfg.scale * c)) for c in class_counts]


def _class_key(name: str) -> int:
    """A stable 64-bit integer for a class name (seeds follow the name, not its position in the list)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def sample_seeds(seed: int, label_name: str, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (seed in [0, 2**63), uniform u in [0, 1)) from numpy's SeedSequence.

    ``SeedSequence(seed, spawn_key=(class, index))`` is numpy's way to derive independent, reproducible
    streams for many workers; the first 64-bit word seeds the generator, the second draws the guidance scale.
    """
    key = _class_key(label_name)
    words = np.array(
        [np.random.SeedSequence(seed, spawn_key=(key, int(i))).generate_state(2, np.uint64) for i in indices],
        dtype=np.uint64,
    ).reshape(-1, 2)
    seeds = (words[:, 0] >> np.uint64(1)).astype(np.int64)
    uniform = (words[:, 1] >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return seeds, uniform


def guidance_scales(cfg: PromptsConfig, uniform: np.ndarray) -> np.ndarray:
    """Map uniforms to guidance scales: integers in [min, max] (official 1..5) or floats."""
    lo, hi = cfg.guidance_min, cfg.guidance_max
    if cfg.guidance_integer:
        first, last = int(np.ceil(lo)), int(np.floor(hi))
        if last < first:
            raise ConfigError("prompts.guidance_integer: no integer between guidance_min and guidance_max")
        values = first + np.minimum((uniform * (last - first + 1)).astype(np.int64), last - first)
        return values.astype(np.float32)
    return (lo + uniform * (hi - lo)).astype(np.float32)


def build_prompt_table(
    cfg: PromptsConfig,
    label_names: list[str],
    *,
    modality: str,
    label_text: dict[str, str],
    class_counts: list[int] | None = None,
) -> pa.Table:
    """One row per synthetic sample, ordered by label then index (schema: ``PROMPT_SCHEMA``)."""
    if not label_names:
        raise ConfigError("labels: no label names to build prompts for")
    if len(set(label_names)) != len(label_names):
        dupes = sorted({n for n in label_names if label_names.count(n) > 1})
        raise ConfigError(f"labels: duplicate label names {dupes}")
    templates = list(cfg.templates) if cfg.templates else default_templates(modality, cfg.domain)
    try:
        check_placeholders(templates, allowed={"label", "domain"}, required="label")
    except ValueError as err:
        raise ConfigError(f"prompts.templates: {err}") from None
    uses_domain = any("{domain}" in t for t in templates)
    if uses_domain and not cfg.domain:
        raise ConfigError("prompts.domain: a template uses {domain} but prompts.domain is not set")
    domains = (cfg.domain if isinstance(cfg.domain, list) else [cfg.domain]) if uses_domain else [None]
    counts = samples_per_class(cfg, len(label_names), class_counts)

    columns: dict[str, list] = {name: [] for name in PROMPT_SCHEMA.names}
    for label, (name, n) in enumerate(zip(label_names, counts, strict=True)):
        text = label_text.get(name, name)
        index = np.arange(n, dtype=np.int64)
        seeds, uniform = sample_seeds(cfg.seed, name, index)
        # Sample i cycles templates first, then domains: every (template, domain) pair gets an equal share.
        chosen = [templates[i % len(templates)] for i in range(n)]
        domain_of = [domains[(i // len(templates)) % len(domains)] for i in range(n)]
        columns["label"] += [label] * n
        columns["label_name"] += [name] * n
        columns["label_text"] += [text] * n
        columns["index"] += index.tolist()
        columns["prompt"] += [t.format(label=text, domain=d) for t, d in zip(chosen, domain_of, strict=True)]
        columns["guidance_scale"] += guidance_scales(cfg, uniform).tolist()
        columns["seed"] += seeds.tolist()
        columns["template"] += chosen
    return pa.table(columns, schema=PROMPT_SCHEMA)
