"""Checks an LLM expansion must pass before it replaces a template prompt (else the template is kept)."""

from __future__ import annotations

import re
from collections.abc import Iterable

_QUOTES = "\"'`“”‘’«»"
_WS = re.compile(r"\s+")


def clean_expansion(text: str | None) -> str:
    """First non-empty line, surrounding quotes removed, whitespace collapsed ('' when nothing is left)."""
    if not isinstance(text, str):
        return ""
    for line in text.splitlines():
        line = _WS.sub(" ", line).strip().strip(_QUOTES).strip()
        if line:
            return line
    return ""


def mentions(text: str, terms: Iterable[str]) -> bool:
    """Whether ``text`` contains one of ``terms`` as a whole word or phrase (case-insensitive)."""
    for term in terms:
        words = term.split()
        if not words:
            continue
        pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
        if re.search(pattern, text, flags=re.IGNORECASE):
            return True
    return False


def dedupe_key(text: str) -> str:
    """Texts differing only in case, spacing or final punctuation count as duplicates."""
    return _WS.sub(" ", text).strip().rstrip(".!?;:, ").casefold()


def validate_expansion(
    text: str | None,
    label_text: str,
    synonyms: Iterable[str],
    min_chars: int,
    max_chars: int,
    seen: set[str],
) -> str | None:
    """The cleaned expansion, or None when it is empty, too short/long, misses the label, or repeats.

    ``seen`` holds the dedupe keys of the class's accepted expansions; an accepted one is added to it.
    """
    cleaned = clean_expansion(text)
    if not cleaned or not min_chars <= len(cleaned) <= max_chars:
        return None
    if not mentions(cleaned, [label_text, *synonyms]):
        return None
    key = dedupe_key(cleaned)
    if key in seen:
        return None
    seen.add(key)
    return cleaned
