"""What every text generator shares: cleaning to one utterance, length bounds, de-duplication, retries.

A text generator proposes one candidate utterance per row and attempt (:meth:`TextGenerator.candidates`);
this base turns candidates into exactly one accepted utterance per row:

- **cleaned**: first non-empty line, a leading speaker tag ("Ross:") and stage directions ("(sighs)",
  "[laughs]", "*smiles*") removed, surrounding quotes stripped, whitespace collapsed;
- **length-bounded**: ``min_words <= words <= max_words`` (words = whitespace-separated tokens);
- **de-duplicated**: two utterances are duplicates when their :func:`dedupe_key` is equal (whitespace
  collapsed, casefolded, trailing ``.!?;:,`` stripped: "Oh my God!" = "oh my  god"). No two rows of the same
  label within one shard are duplicates. The pipeline hands text generators one whole shard per call
  (``Generator.whole_shards``), and acceptance runs in row order, attempt by attempt, so the texts of a call are
  a function of its rows alone: per shard, not of Ray's batching or actors;
- **retried, never dropped**: a rejected candidate (empty, out of bounds, duplicate, or the backend gave no
  text) is retried with the row's next attempt seed (attempt 0 = the row's seed, attempt k > 0 = a 63-bit
  seed drawn from ``SeedSequence([seed, k])``). A row still without an utterance after ``max_attempts``
  fails the shard (and the step) with one line saying why; a shard never has fewer rows than asked.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from gptfl_ray.errors import shorten
from gptfl_ray.generate.base import Generator, GeneratorOptions
from gptfl_ray.prompts.validation import clean_expansion, dedupe_key

__all__ = ["TextGenerator", "TextOptions", "attempt_seed", "clean_utterance", "dedupe_key", "word_count"]

_SPEAKER = re.compile(r"^[A-Z][\w.'-]*(?: [A-Z][\w.'-]*){0,2}(?: \([^)]*\))?:\s+(?=\S)")
_DIRECTION = re.compile(r"\([^)]*\)|\[[^\]]*\]|\*[^*]*\*")
_QUOTES = "\"'`“”‘’«»"


class TextOptions(GeneratorOptions):
    """Options every text generator takes (``generate.options``)."""

    min_words: int = Field(2, ge=1)  # accepted utterances have min_words..max_words words
    max_words: int = Field(30, ge=1)
    max_attempts: int = Field(20, ge=1)  # candidates tried per row before the shard fails

    @field_validator("max_words")
    @classmethod
    def _check_bounds(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_words")
        if low is not None and value < low:
            raise ValueError(f"must be >= min_words ({low})")
        return value


def clean_utterance(text: str | None) -> str:
    """One utterance from a raw generation ('' when nothing usable is left)."""
    line = clean_expansion(text)  # first non-empty line, quotes stripped, whitespace collapsed
    line = _SPEAKER.sub("", line, count=1)
    line = _DIRECTION.sub(" ", line)
    return " ".join(line.split()).strip(_QUOTES).strip()


def word_count(text: str) -> int:
    return len(text.split())


def attempt_seed(seed: int, attempt: int) -> int:
    """The seed of a row's ``attempt``-th candidate, in [0, 2**63): the row's own seed first."""
    if attempt == 0:
        return int(seed)
    word = np.random.SeedSequence([int(seed), int(attempt)]).generate_state(1, np.uint64)[0]
    return int(word >> np.uint64(1))


class TextGenerator(Generator):
    """Base of the text generators: subclasses implement :meth:`candidates`."""

    kind = "text"
    modality = "text"
    whole_shards = True
    Options = TextOptions

    def candidates(self, rows: list[dict[str, Any]], attempt: int) -> list[tuple[str | None, dict[str, Any]]]:
        """One raw candidate (None: the backend gave none) and its metadata per row, for ``attempt``; each
        row's ``seed`` is already its attempt seed. Must depend only on the row, not on its batch-mates."""
        raise NotImplementedError

    def generate(self, batch):
        o: TextOptions = self.options  # type: ignore[assignment]
        rows = [
            {k: _plain(v[i]) for k, v in batch.items()} for i in range(len(batch["prompt"]))
        ]  # every prompt-table column, as Python values
        order = sorted(range(len(rows)), key=lambda i: int(rows[i]["row"]))
        rps = self.cfg.rows_per_shard
        seen: dict[tuple[int, int], set[str]] = {}  # (shard, label) -> accepted keys
        texts: list[str | None] = [None] * len(rows)
        meta: list[dict[str, Any]] = [{} for _ in rows]
        why: list[Counter[str]] = [Counter() for _ in rows]
        last: list[str] = [""] * len(rows)
        pending = order
        for attempt in range(o.max_attempts):
            if not pending:
                break
            tries = [{**rows[i], "seed": attempt_seed(rows[i]["seed"], attempt)} for i in pending]
            proposals = self.candidates(tries, attempt)
            if len(proposals) != len(tries):
                raise RuntimeError(
                    f"generator {self.name!r} proposed {len(proposals)} texts for {len(tries)}"
                )
            still = []
            for i, (raw, info) in zip(pending, proposals, strict=True):  # row order: deterministic winners
                text, reason = self._check(raw, rows[i], rps, seen)
                if text is None:
                    why[i][reason] += 1
                    last[i] = shorten(" ".join(str(raw).split()), 60) if raw else ""
                    still.append(i)
                    continue
                texts[i] = text
                meta[i] = {**info, "attempt": attempt, "rejected": dict(why[i])}
            pending = still
        if pending:
            self._fail(rows, pending, why, last)
        return texts, meta

    def _check(
        self, raw: str | None, row: dict[str, Any], rps: int, seen: dict[tuple[int, int], set[str]]
    ) -> tuple[str | None, str]:
        """(the accepted utterance, "") or (None, why it was rejected); an accepted key joins ``seen``."""
        o: TextOptions = self.options  # type: ignore[assignment]
        if raw is None:
            return None, "no text from the backend"
        text = clean_utterance(raw)
        if not text:
            return None, "empty"
        n = word_count(text)
        if n < o.min_words:
            return None, "too short"
        if n > o.max_words:
            return None, "too long"
        keys = seen.setdefault((int(row["row"]) // rps, int(row["label"])), set())
        key = dedupe_key(text)
        if key in keys:
            return None, "duplicate"
        keys.add(key)
        return text, ""

    def _fail(self, rows: list[dict[str, Any]], pending: list[int], why: list[Counter[str]], last: list[str]):
        o: TextOptions = self.options  # type: ignore[assignment]
        reasons = sum((why[i] for i in pending), Counter())
        first = rows[pending[0]]
        detail = ", ".join(f"{r} ×{n}" for r, n in reasons.most_common(3))
        example = f"; e.g. {last[pending[0]]!r}" if last[pending[0]] else ""
        raise RuntimeError(
            f"generate.options.max_attempts: {len(pending)} row(s) (first: row {first['row']}, label "
            f"{first['label_name']!r}) got no accepted utterance in {o.max_attempts} attempts ({detail}{example}); "
            f"widen generate.options.min_words..max_words ({o.min_words}..{o.max_words}), raise max_attempts, "
            "or ask fewer rows per class"
        )


def _plain(value: Any) -> Any:
    """A numpy scalar -> the Python value (rows go to JSON metadata and to HTTP bodies)."""
    return value.item() if isinstance(value, np.generic) else value
