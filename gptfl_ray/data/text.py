"""Text -> fixed-length token ids, the same way for real and synthetic text (``features.to_tensors``).

Two tokenizers (``data.text.tokenizer``):

- ``hash`` (the default for registry and ``module:callable`` models): the ``tokenizers`` library's BERT-style
  normalisation and pre-tokenization (NFKC, curly quotes made straight, lower case, split on whitespace and
  punctuation), then each word is hashed (BLAKE2b) into ``HASH_VOCAB`` ids. It is trained on nothing, so it is
  the same in every process, arm and seed, and no text reaches the server through it: a vocabulary learnt from
  the clients' utterances (or the test split) would hand the server their words, and one learnt from the
  synthetic text alone would map every real word the generator never wrote to one unknown id, starving FL of
  the words only the clients have. Distinct words collide: MELD's 5,382 distinct training words (after
  normalisation) get 4,571 distinct ids.
- a Hugging Face tokenizer by hub id or local path (``AutoTokenizer``): a ``hf:`` model's own (the default for
  such a model), with its special tokens ([CLS]/[SEP], ...).

Ids are int64 (N, ``max_length``), cut at ``max_length`` tokens and padded with ``PAD`` = -1, which every text
model masks, so no tokenizer's pad token has to agree with a model's.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from gptfl_ray.errors import InputError, shorten

PAD = -1
HASH = "hash"
HASH_VOCAB = 1 << 14  # ids of the hashing tokenizer: the embedding rows of text_cnn


@functools.lru_cache(maxsize=1)
def _splitter() -> tuple[Any, Any]:
    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Replace("\u2019", "'"),  # ’ (MELD writes you’re, don’t)
            normalizers.Replace("\u2018", "'"),
            normalizers.Replace("\u201c", '"'),
            normalizers.Replace("\u201d", '"'),
            normalizers.Lowercase(),
        ]
    )
    return norm, pre_tokenizers.BertPreTokenizer()


def words(text: str) -> list[str]:
    """The words the hashing tokenizer sees: normalised, split on whitespace and punctuation."""
    norm, pre = _splitter()
    return [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))]


def word_id(word: str) -> int:
    """A word's id in [0, HASH_VOCAB): a BLAKE2b hash (the same in every process, unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") % HASH_VOCAB


def hash_ids(texts: Sequence[str], max_length: int) -> np.ndarray:
    out = np.full((len(texts), max_length), PAD, dtype=np.int64)
    seen: dict[str, int] = {}
    for i, text in enumerate(texts):
        for j, w in enumerate(words(text)[:max_length]):
            k = seen.get(w)
            if k is None:
                k = seen[w] = word_id(w)
            out[i, j] = k
    return out


@functools.lru_cache(maxsize=4)
def hf_tokenizer(name: str) -> Any:
    """``AutoTokenizer.from_pretrained(name)`` (hub id or local path), once per process."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        first = shorten(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__, 160)
        raise InputError(f"data.text.tokenizer: cannot load the tokenizer {name!r} ({first})") from None


def hf_ids(texts: Sequence[str], name: str, max_length: int) -> np.ndarray:
    enc = hf_tokenizer(name)(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]
    out = np.full((len(texts), max_length), PAD, dtype=np.int64)
    for i, ids in enumerate(enc):
        out[i, : len(ids)] = ids
    return out


def tokenizer_name(text_cfg: Any) -> str:
    """``data.text.tokenizer`` resolved: "hash" or a Hugging Face tokenizer's id/path."""
    return (text_cfg.tokenizer if text_cfg is not None else None) or HASH


def text_ids(texts: Sequence[Any], text_cfg: Any = None) -> np.ndarray:
    """int64 (N, max_length) token ids of ``texts`` under ``text_cfg`` (a ``TextConfig``; None = defaults)."""
    from gptfl_ray.config import TextConfig

    cfg = text_cfg or TextConfig()
    texts = [str(t) for t in texts]
    name = tokenizer_name(cfg)
    return hash_ids(texts, cfg.max_length) if name == HASH else hf_ids(texts, name, cfg.max_length)


__all__ = ["HASH", "HASH_VOCAB", "PAD", "hash_ids", "hf_tokenizer", "text_ids", "tokenizer_name", "words"]
