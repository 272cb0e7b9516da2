"""Invertible Bloom lookup table (Goodrich & Mitzenmacher, "Invertible Bloom Lookup Tables", 2011) as a linear
sketch over the prime field ``GF(2^61 - 1)``.

A table is a flat ``uint64`` vector of ``cells × (1 + key_elements + 1)`` field elements: per cell a count,
the key split into field elements (summed), and a keyed-hash check-sum. ``encode`` is linear, so the sum of
many clients' tables (e.g. under secure aggregation, in the same field) is the table of the multiset union,
and ``decode`` peels it back to ``{label: count}``.

Keys are UTF-8 label names of at most ``max_label_bytes`` bytes, encoded as ``len (2 bytes) || utf8 || 0-pad``
and cut into 7-byte field elements. Each key lands in one cell of each of ``repetitions`` disjoint sub-tables
(partitioned IBLT), at positions from BLAKE2b keyed with the shared ``seed``. Because counts live in a field,
a cell holding ``c`` copies of one key stores ``c·key``; decoding divides by ``c`` (field inverse), so
multiplicities (per-label client counts) decode too, and negative counts wrap to ``p - c``.

Table size follows the published peeling thresholds ``cells ≥ c_k · n`` (c_3 = 1.222, ...): below them
peeling fails with high probability. Those are asymptotic, so small tables get the extra margin measured in
``tests/test_iblt.py``. A table that cannot be fully peeled raises :class:`IBLTDecodeError` saying how much
was left; a partial union is never returned.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from gptfl_ray.errors import ConfigError, UserError
from gptfl_ray.labels.ring import Ring

PRIME = 2**61 - 1
FIELD = Ring(PRIME)
CHUNK_BYTES = 7  # 56-bit chunks are < PRIME
LEN_BYTES = 2
# Goodrich & Mitzenmacher (2011), Table 1: peeling succeeds w.h.p. when cells > c_k · keys (k = repetitions).
# k = 2 is the 2-core threshold of random graphs (failure probability only polynomially small there).
PEELING_OVERHEAD = {2: 2.0, 3: 1.222, 4: 1.295, 5: 1.425, 6: 1.570, 7: 1.721}
# Those thresholds are asymptotic. Finite tables get (a) SLACK over c_k and (b) sub-tables large enough that
# the dominant small-table failure -- two keys hashed to the same cell in every sub-table, probability about
# C(n, 2) / subtable^k -- stays below TARGET_FAILURE. Measured failure rates at full capacity: tests/test_iblt.py.
SLACK = 1.5
TARGET_FAILURE = 1e-4
MIN_CELLS_PER_SUBTABLE = 8


class IBLTDecodeError(UserError, ValueError):
    """The table could not be fully peeled (more distinct keys than its capacity, or a corrupted sum)."""


def table_cells(capacity: int, repetitions: int) -> int:
    """Cells for ``capacity`` distinct keys (a multiple of ``repetitions``); see the module docstring."""
    if capacity < 1:
        raise ValueError(f"iblt capacity must be >= 1 (got {capacity})")
    if repetitions not in PEELING_OVERHEAD:
        raise ValueError(f"iblt repetitions must be in {sorted(PEELING_OVERHEAD)} (got {repetitions})")
    k = repetitions
    threshold = math.ceil(PEELING_OVERHEAD[k] * SLACK * capacity / k)
    pairs = capacity * (capacity - 1) / 2
    no_twin_keys = math.ceil((pairs / TARGET_FAILURE) ** (1 / k))
    return k * max(threshold, no_twin_keys, MIN_CELLS_PER_SUBTABLE)


@dataclass(frozen=True)
class IBLTParams:
    """Everything clients and server must share to encode and decode compatible tables (JSON-friendly)."""

    capacity: int = 256
    repetitions: int = 4
    seed: int = 0
    max_label_bytes: int = 64
    prime: int = PRIME


class IBLT:
    """Encode label multisets into field vectors and decode sums of them."""

    def __init__(self, capacity: int = 256, repetitions: int = 4, seed: int = 0, max_label_bytes: int = 64):
        if not 1 <= max_label_bytes < 2 ** (8 * LEN_BYTES):
            raise ValueError(f"iblt max_label_bytes must be in 1..65535 (got {max_label_bytes})")
        self.params = IBLTParams(capacity, repetitions, seed, max_label_bytes)
        self.capacity, self.repetitions = capacity, repetitions
        self.cells = table_cells(capacity, repetitions)
        self.subtable = self.cells // repetitions
        self.key_elements = math.ceil((LEN_BYTES + max_label_bytes) / CHUNK_BYTES)
        self.width = 2 + self.key_elements  # count | key elements | check-sum
        self._hash_key = seed.to_bytes(16, "big", signed=True)

    @classmethod
    def from_params(cls, params: IBLTParams | Mapping[str, int]) -> IBLT:
        """Rebuild from :class:`IBLTParams` or a :meth:`describe` dict (its derived sizes are checked)."""
        p = asdict(params) if isinstance(params, IBLTParams) else dict(params)
        if p.pop("prime", PRIME) != PRIME:
            raise ValueError("iblt: only the field 2^61 - 1 is supported")
        derived = {k: p.pop(k) for k in ("cells", "vector_len") if k in p}
        table = cls(**p)
        for key, value in derived.items():
            if getattr(table, key) != value:
                raise ValueError(
                    f"iblt: {key}={value} does not match {getattr(table, key)} for {table.params}"
                )
        return table

    @property
    def vector_len(self) -> int:
        return self.cells * self.width

    @property
    def ring(self) -> Ring:
        return FIELD

    def describe(self) -> dict[str, int]:
        return {**asdict(self.params), "cells": self.cells, "vector_len": self.vector_len}

    # ------------------------------------------------------------------ keys
    def _key_bytes(self, label: str) -> bytes:
        if not isinstance(label, str) or not label:
            raise ValueError(f"iblt: labels must be non-empty strings (got {label!r})")
        raw = label.encode("utf-8")
        if len(raw) > self.params.max_label_bytes:
            raise ConfigError(
                f"iblt: label {label[:40]!r}… is {len(raw)} UTF-8 bytes, more than "
                f"labels.iblt_max_label_bytes={self.params.max_label_bytes}"
            )
        return raw

    def _elements(self, raw: bytes) -> list[int]:
        blob = len(raw).to_bytes(LEN_BYTES, "big") + raw
        blob = blob.ljust(self.key_elements * CHUNK_BYTES, b"\0")
        return [int.from_bytes(blob[i : i + CHUNK_BYTES], "big") for i in range(0, len(blob), CHUNK_BYTES)]

    def _hash(self, raw: bytes) -> tuple[list[int], int]:
        """Cell index in each sub-table and the check-sum value of a key."""
        digest = hashlib.blake2b(
            raw, key=self._hash_key, digest_size=8 * (self.repetitions + 1), person=b"gptfl-iblt"
        ).digest()
        words = [int.from_bytes(digest[8 * i : 8 * i + 8], "big") for i in range(self.repetitions + 1)]
        cells = [j * self.subtable + words[j] % self.subtable for j in range(self.repetitions)]
        return cells, words[-1] % PRIME

    def _row(self, raw: bytes, count: int) -> tuple[list[int], list[int]]:
        cells, check = self._hash(raw)
        c = count % PRIME
        return cells, [c] + [c * e % PRIME for e in self._elements(raw)] + [c * check % PRIME]

    # ------------------------------------------------------------------ encode / combine
    def encode(self, labels: Iterable[str] | Mapping[str, int]) -> np.ndarray:
        """A table holding each label once (iterable) or ``count`` times (mapping; counts may be negative)."""
        counts: dict[str, int] = {}
        if isinstance(labels, Mapping):
            counts = {str(k): int(v) for k, v in labels.items()}
        else:
            for label in labels:
                counts[label] = 1
        if len(counts) > self.capacity:
            raise ConfigError(
                f"iblt: {len(counts)} distinct labels exceed the table capacity {self.capacity} "
                "(raise labels.iblt_capacity)"
            )
        table = np.zeros((self.cells, self.width), dtype=np.uint64)
        for label, count in counts.items():
            cells, row = self._row(self._key_bytes(label), count)
            row_arr = np.array(row, dtype=np.uint64)
            for cell in cells:
                FIELD.add(table[cell], row_arr, out=table[cell])
        return table.ravel()

    def add(self, *vectors: np.ndarray) -> np.ndarray:
        """The table of the multiset union (element-wise sum in the field)."""
        return FIELD.sum([self._check(v) for v in vectors])

    def subtract(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return FIELD.sub(self._check(a), self._check(b))

    def _check(self, v: np.ndarray) -> np.ndarray:
        v = FIELD.check(v, "iblt table")
        if v.shape != (self.vector_len,):
            raise ValueError(
                f"iblt: table has shape {v.shape}, expected ({self.vector_len},) for {self.params}"
            )
        return v

    # ------------------------------------------------------------------ decode
    def _pure_key(self, cell: int, row: list[int]) -> bytes | None:
        """The key if ``row`` holds copies of exactly one key, else None."""
        c = row[0]
        if c == 0:
            return None
        inv = pow(c, PRIME - 2, PRIME)
        elements = [e * inv % PRIME for e in row[1:-1]]
        if any(e >= 1 << (8 * CHUNK_BYTES) for e in elements):
            return None
        blob = b"".join(e.to_bytes(CHUNK_BYTES, "big") for e in elements)
        n = int.from_bytes(blob[:LEN_BYTES], "big")
        raw = blob[LEN_BYTES : LEN_BYTES + n]
        if not 0 < n <= self.params.max_label_bytes or any(blob[LEN_BYTES + n :]):
            return None
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        cells, check = self._hash(raw)
        if cell not in cells or c * check % PRIME != row[-1]:
            return None
        return raw

    def decode(self, vector: np.ndarray) -> dict[str, int]:
        """``{label: count}`` of a table (counts as signed field values, zero counts absent)."""
        rows = self._check(vector).reshape(self.cells, self.width).tolist()
        found: dict[bytes, int] = {}
        queue = list(range(self.cells))
        peels = 0
        while queue and peels <= 2 * self.cells:  # a valid table peels at most one key per filled cell
            cell = queue.pop()
            raw = self._pure_key(cell, rows[cell])
            if raw is None:
                continue
            count = rows[cell][0]
            cells, row = self._row(raw, count)
            for j in cells:
                rows[j] = [(a - b) % PRIME for a, b in zip(rows[j], row, strict=True)]
                queue.append(j)
            found[raw] = (found.get(raw, 0) + count) % PRIME
            peels += 1
        left = [r for r in rows if any(r)]
        if left:
            residual = sum(r[0] if r[0] <= PRIME // 2 else r[0] - PRIME for r in left)
            raise IBLTDecodeError(
                f"IBLT decode failed: {len(left)} of {self.cells} cells could not be peeled "
                f"(about {max(1, round(residual / self.repetitions))} label entries undecoded, "
                f"{len(found)} labels decoded); the union holds more distinct labels than the capacity "
                f"{self.capacity} supports, or the table is corrupted — raise labels.iblt_capacity"
            )
        out = {}
        for raw, c in found.items():
            if c:
                out[raw.decode("utf-8")] = c if c <= PRIME // 2 else c - PRIME
        return out
