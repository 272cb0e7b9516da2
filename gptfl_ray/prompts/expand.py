"""LLM prompt expansion: one interface over the backends, one shared validation + fallback stage.

``expand_prompts(ds, cfg)`` = backend (adds ``raw_expansion``) -> per-class validation (label or synonym
present, length bounds, no repeat within the class) -> ``prompt`` = expansion, or the row's template prompt
with ``expansion_fallback`` True. Validation runs per class in (class, index) order, so which duplicate is
kept does not depend on how Ray split the data. More than ``max_fallback_fraction`` of the rows falling back
fails the step in one line naming the endpoint and what it answered (an unreachable endpoint, a wrong key or
model name must not silently turn an LLM run into a template run). Backends:

- ``templates``: identity (offline default), ``expansion_fallback`` False everywhere.
- ``transformers``: a causal LM in a Ray Data actor pool, one ``generate`` call per batch, each row sampled
  from its own seeded stream (``TransformersPromptExpander``; the seeding contract is in its module).
- ``vllm``: ray.data.llm processor with vLLM engine actors (``backend_vllm``).
- ``openai``: OpenAI-compatible chat completions over HTTP (``OpenAIPromptExpander``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from gptfl_ray.errors import ConfigError, UserError
from gptfl_ray.prompts.instruction import check_columns
from gptfl_ray.prompts.validation import validate_expansion

if TYPE_CHECKING:
    import ray.data

    from gptfl_ray.config import ExpanderConfig

logger = logging.getLogger(__name__)

FALLBACK_COLUMN = "expansion_fallback"
RAW_COLUMN = "raw_expansion"
REASON_COLUMN = "expansion_error"  # optional, from the backend: why raw_expansion is None
REJECTED = "rejected by validation (no label or synonym, wrong length, or a repeat)"


class ExpansionFallbackError(UserError):
    """Too many prompts fell back to their templates (``prompts.expander.max_fallback_fraction``)."""


def check_backend_config(cfg: ExpanderConfig) -> None:
    """Fail fast, naming the field, before any actor starts."""
    if cfg.backend in ("transformers", "vllm", "openai") and not cfg.model:
        raise ConfigError(
            f"prompts.expander.model: required for backend {cfg.backend!r} (hub id or local path)"
        )
    if cfg.backend == "openai":
        if not cfg.base_url:
            raise ConfigError(
                "prompts.expander.base_url: required for backend 'openai' (e.g. http://host:8000/v1)"
            )
        if not cfg.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"prompts.expander.base_url: must start with http:// or https:// (got {cfg.base_url!r})"
            )
        from gptfl_ray.prompts.backend_openai import api_headers

        api_headers(cfg)  # the key rule, on the driver before any actor starts


def endpoint_name(cfg: ExpanderConfig) -> str:
    """What the expansions came from, for messages: the URL, or the model a local engine ran."""
    if cfg.backend == "openai":
        from gptfl_ray.prompts.backend_openai import endpoint_url

        return f"endpoint {endpoint_url(cfg)}"
    return f"{cfg.backend} model {cfg.model}"


def backend_failures(table: pa.Table) -> Counter[str]:
    """Why the backend returned no text, per reason (``expansion_error``; "no reply" when it gave none)."""
    raw = table[RAW_COLUMN].to_pylist()
    reasons = table[REASON_COLUMN].to_pylist() if REASON_COLUMN in table.column_names else [None] * len(raw)
    return Counter(reason or "no reply" for text, reason in zip(raw, reasons, strict=True) if text is None)


def check_fallback_fraction(table: pa.Table, failures: Counter[str], cfg: ExpanderConfig) -> None:
    """Raise :class:`ExpansionFallbackError` when more than ``cfg.max_fallback_fraction`` of the validated
    ``table``'s rows fell back; the message names the endpoint and the most frequent reasons."""
    total, fallbacks = table.num_rows, count_fallbacks(table)
    if total == 0 or fallbacks <= cfg.max_fallback_fraction * total:
        return
    seen = Counter(failures)
    rejected = fallbacks - sum(failures.values())
    if rejected > 0:
        seen[REJECTED] = rejected
    detail = "; ".join(f"{reason} ×{n}" for reason, n in seen.most_common(3))
    raise ExpansionFallbackError(
        f"prompts.expander.max_fallback_fraction: {fallbacks}/{total} prompts ({fallbacks / total:.0%}) fell "
        f"back to their templates, more than {cfg.max_fallback_fraction:g}; {endpoint_name(cfg)}: {detail}"
    )


def _expander_class(cfg: ExpanderConfig) -> type:
    if cfg.backend == "transformers":
        from gptfl_ray.prompts.backend_transformers import TransformersPromptExpander

        return TransformersPromptExpander
    if cfg.backend == "openai":
        from gptfl_ray.prompts.backend_openai import OpenAIPromptExpander

        return OpenAIPromptExpander
    raise ValueError(f"prompts.expander.backend: no in-process expander for {cfg.backend!r}")


# ------------------------------------------------------------------------------------------ validation
def _synonyms_for(row: dict[str, Any], synonyms: dict[str, list[str]]) -> list[str]:
    """Synonyms are keyed by label name; a key equal to the label text also works."""
    terms = list(synonyms.get(row["label_name"], []))
    if row["label_text"] != row["label_name"]:
        terms += synonyms.get(row["label_text"], [])
    return terms


def validate_expansions(table: pa.Table, cfg: ExpanderConfig) -> pa.Table:
    """Validate ``raw_expansion`` per class in index order; fill ``prompt`` and the fallback flag.

    Returns the table sorted by (label, index) without ``raw_expansion``.
    """
    order = "index" if "index" in table.column_names else "seed"
    table = table.sort_by([("label", "ascending"), (order, "ascending")])
    prompts, fallback = [], []
    seen: dict[int, set[str]] = {}
    for row in table.select(["label", "label_name", "label_text", "prompt", RAW_COLUMN]).to_pylist():
        text = validate_expansion(
            row[RAW_COLUMN],
            row["label_text"],
            _synonyms_for(row, cfg.synonyms),
            cfg.min_chars,
            cfg.max_chars,
            seen.setdefault(row["label"], set()),
        )
        prompts.append(row["prompt"] if text is None else text)
        fallback.append(text is None)
    drop = (RAW_COLUMN, REASON_COLUMN, FALLBACK_COLUMN)
    table = table.drop_columns([c for c in drop if c in table.column_names])
    table = table.set_column(table.column_names.index("prompt"), "prompt", pa.array(prompts, pa.string()))
    return _prompt_types(table.append_column(FALLBACK_COLUMN, pa.array(fallback, pa.bool_())))


def _prompt_types(table: pa.Table) -> pa.Table:
    """Restore the prompt-table column types lost on row-wise paths (e.g. float32 guidance -> Python float)."""
    from gptfl_ray.prompts.templates import PROMPT_SCHEMA

    for field in PROMPT_SCHEMA:
        if field.name in table.column_names and table.schema.field(field.name).type != field.type:
            i = table.column_names.index(field.name)
            table = table.set_column(i, field.name, table[field.name].cast(field.type))
    return table


def _no_expansion(table: pa.Table) -> pa.Table:
    table = table.drop_columns([c for c in (FALLBACK_COLUMN,) if c in table.column_names])
    return table.append_column(FALLBACK_COLUMN, pa.array([False] * table.num_rows, pa.bool_()))


# ---------------------------------------------------------------------------------------- public API
def expand_prompts(ds: ray.data.Dataset, cfg: ExpanderConfig) -> ray.data.Dataset:
    """Replace ``prompt`` by validated LLM expansions; adds bool ``expansion_fallback``.

    ``templates``: a lazy identity stage. LLM backends run as a Ray Data stage (actor pool / vLLM engines),
    then the raw expansions are collected and validated class by class in index order (de-duplication needs
    each class's expansions together: a barrier, like a groupby, but without a hash shuffle for a table of
    short strings); the result is a materialized dataset with as many blocks as the expansion produced.
    """
    if cfg.backend == "templates":
        return ds.map_batches(_no_expansion, batch_format="pyarrow", batch_size=None)
    import ray
    import ray.data

    check_backend_config(cfg)
    check_columns(list(ds.columns()))
    if cfg.backend == "vllm":
        from gptfl_ray.prompts.backend_vllm import vllm_raw_expansions

        raw = vllm_raw_expansions(ds, cfg)
    else:
        raw = ds.map_batches(
            _expander_class(cfg),
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),  # each actor loads the model once
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
        )
    blocks = [b for b in ray.get(raw.to_arrow_refs()) if b.num_rows]
    if not blocks:  # empty table: nothing to expand
        return ds.map_batches(_no_expansion, batch_format="pyarrow", batch_size=None)
    raw_table = pa.concat_tables(blocks, promote_options="default")
    table = validate_expansions(raw_table, cfg)
    check_fallback_fraction(table, backend_failures(raw_table), cfg)
    n = len(blocks)
    step = -(-table.num_rows // n)
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])


def expand_rows(rows: list[dict[str, Any]], cfg: ExpanderConfig) -> list[dict[str, Any]]:
    """Plain-Python ``expand_prompts`` for small tables and tests (same backends, same validation)."""
    if not rows:
        return []
    table = pa.Table.from_pylist(rows)
    if cfg.backend == "templates":
        return _no_expansion(table).to_pylist()
    check_backend_config(cfg)
    check_columns(table.column_names)
    if cfg.backend == "vllm":  # the engine only runs inside Ray Data
        import ray.data

        return expand_prompts(ray.data.from_arrow(table), cfg).take_all()
    expander = _expander_class(cfg)(cfg)
    table = table.drop_columns([c for c in (RAW_COLUMN, REASON_COLUMN) if c in table.column_names])
    raw_table = pa.concat_tables(  # the actor's own call per batch: the same columns as in Ray Data
        [expander(table.slice(start, cfg.batch_size)) for start in range(0, table.num_rows, cfg.batch_size)]
    )
    validated = validate_expansions(raw_table, cfg)
    check_fallback_fraction(validated, backend_failures(raw_table), cfg)
    return validated.to_pylist()


def count_fallbacks(table: pa.Table | ray.data.Dataset | Iterable[dict[str, Any]]) -> int:
    """Rows whose expansion failed and kept their template prompt (0 when nothing was expanded)."""
    if isinstance(table, pa.Table):
        if FALLBACK_COLUMN not in table.column_names:
            return 0
        return int(pc.sum(pc.cast(table[FALLBACK_COLUMN], pa.int64())).as_py() or 0)
    if hasattr(table, "select_columns") and hasattr(table, "columns"):  # a Ray Dataset
        if FALLBACK_COLUMN not in table.columns():
            return 0
        counts = table.select_columns([FALLBACK_COLUMN]).to_arrow_refs()
        import ray

        return sum(count_fallbacks(t) for t in ray.get(counts))
    return sum(bool(row.get(FALLBACK_COLUMN)) for row in table)
