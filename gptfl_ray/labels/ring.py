"""Modular arithmetic on numpy vectors, the mask PRG, and fixed-point quantisation for secure aggregation.

Everything secure aggregation adds lives in a ring ``Z_m``: a power of two ``2^k`` (k <= 64; FL updates) or
an odd modulus below ``2^63`` such as the IBLT's prime field ``2^61 - 1`` (label sketches). Elements are kept
in ``uint64`` arrays so sums of vectors are single vectorised numpy operations; the wire format packs rings of
at most 32 bits into ``uint32``.

Quantisation (public, the FL side uses it): floats are clipped to ``[-clip, clip]``, scaled by a power of two,
rounded and mapped to the ring in two's-complement style; a sum of many such vectors decodes exactly as long
as the true integer sum stays within ``(-m/2, m/2)``, which :func:`fixed_point_scale` guarantees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_U64 = np.uint64


@dataclass(frozen=True)
class Ring:
    """``Z_modulus`` on ``uint64`` arrays: a power of two up to ``2^64`` or any modulus up to ``2^63``."""

    modulus: int

    def __post_init__(self) -> None:
        m = self.modulus
        if not isinstance(m, int) or m < 2:
            raise ValueError(f"ring modulus must be an integer >= 2 (got {m!r})")
        if m > 2**63 and m != 2**64:
            raise ValueError(f"ring modulus must be <= 2^63 or exactly 2^64 (got {m})")

    @classmethod
    def bits(cls, k: int) -> Ring:
        """The ring ``Z_{2^k}``."""
        if not 1 <= k <= 64:
            raise ValueError(f"ring bits must be in 1..64 (got {k})")
        return cls(1 << k)

    # ------------------------------------------------------------------ properties
    @property
    def is_pow2(self) -> bool:
        return self.modulus & (self.modulus - 1) == 0

    @property
    def bit_length(self) -> int:
        """Bits needed to hold one element."""
        return (self.modulus - 1).bit_length()

    @property
    def wire_dtype(self) -> np.dtype:
        return np.dtype(np.uint32) if self.modulus <= 2**32 else np.dtype(np.uint64)

    @property
    def half(self) -> int:
        """Elements ``>= half`` decode as negative integers."""
        return (self.modulus + 1) // 2

    # ------------------------------------------------------------------ arithmetic
    def zeros(self, n: int) -> np.ndarray:
        return np.zeros(n, dtype=_U64)

    def _wrap(self, a: np.ndarray) -> np.ndarray:
        if self.is_pow2 and self.modulus != 2**64:
            np.bitwise_and(a, _U64(self.modulus - 1), out=a)
        return a

    def add(self, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``(a + b) mod m``; pass ``out=a`` to accumulate in place."""
        out = np.add(a, b, out=out)  # uint64 wraps mod 2^64, which is exact for every power-of-two ring
        if self.is_pow2:
            return self._wrap(out)
        # a, b < m <= 2^63, so a + b did not wrap: one conditional subtraction reduces it.
        m = _U64(self.modulus)
        return np.subtract(out, m, out=out, where=out >= m)

    def neg(self, a: np.ndarray) -> np.ndarray:
        if self.is_pow2:
            return self._wrap(np.negative(a))
        return np.where(a == 0, a, _U64(self.modulus) - a)

    def sub(self, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if self.is_pow2:
            return self._wrap(np.subtract(a, b, out=out))
        return self.add(a, self.neg(b), out=out)

    def sum(self, vectors: list[np.ndarray]) -> np.ndarray:
        if not vectors:
            raise ValueError("ring sum of no vectors")
        total = self.check(vectors[0]).copy()
        for v in vectors[1:]:
            self.add(total, self.check(v), out=total)
        return total

    def check(self, a: np.ndarray, name: str = "vector") -> np.ndarray:
        """Validate ``a`` holds ring elements; returns it as ``uint64`` (wire ``uint32`` is widened)."""
        a = np.asarray(a)
        if a.dtype not in (np.uint64, np.uint32):
            raise ValueError(f"{name}: ring elements must be uint64 or uint32 (got {a.dtype})")
        a = a.astype(_U64, copy=False)
        if self.modulus != 2**64 and a.size and int(a.max()) >= self.modulus:
            raise ValueError(f"{name}: element {int(a.max())} is outside Z_{self.modulus}")
        return a

    # ------------------------------------------------------------------ signed integers
    def from_signed(self, x: np.ndarray) -> np.ndarray:
        """Map int64 values to ring elements (``-1 -> m - 1``)."""
        x = np.asarray(x, dtype=np.int64)
        if self.is_pow2:
            return self._wrap(x.view(_U64).copy())
        return np.mod(x, np.int64(self.modulus)).astype(_U64)

    def to_signed(self, a: np.ndarray) -> np.ndarray:
        """Ring elements to int64 in ``[-m/2, m/2)``."""
        a = np.asarray(a, dtype=_U64)
        if self.modulus == 2**64:
            return a.view(np.int64).copy()
        out = a.astype(np.int64)
        out[a >= _U64(self.half)] -= np.int64(self.modulus)
        return out

    # ------------------------------------------------------------------ wire format
    def pack(self, a: np.ndarray) -> np.ndarray:
        """Smallest unsigned dtype holding every element (what goes over the network)."""
        return np.ascontiguousarray(a, dtype=self.wire_dtype)

    def nbytes(self, n: int) -> int:
        return n * self.wire_dtype.itemsize

    # ------------------------------------------------------------------ randomness
    def random(self, seed: bytes, n: int) -> np.ndarray:
        """``n`` uniform ring elements expanded from a 32-byte ``seed`` (deterministic)."""
        stream = KeyStream(seed)
        if self.is_pow2:
            return self._wrap(stream.words(n))
        # Rejection sampling keeps the masks exactly uniform for a non-power-of-two modulus: draw words,
        # keep the low bit_length bits, accept values below m (acceptance >= 1/2; ~1 for 2^61 - 1).
        mask, m = _U64((1 << self.bit_length) - 1), _U64(self.modulus)
        parts, have = [], 0
        while have < n:
            draw = stream.words(int((n - have) * 1.02) + 64) & mask
            keep = draw[draw < m]
            parts.append(keep)
            have += len(keep)
        return np.concatenate(parts)[:n]


class KeyStream:
    """AES-256-CTR keystream as the cryptographic PRG expanding a seed into mask words.

    Each seed is a fresh 32-byte key used for exactly one vector, so a fixed all-zero counter block is safe.
    """

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError(f"PRG seed must be 32 bytes (got {len(seed)})")
        self._enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()

    def words(self, n: int) -> np.ndarray:
        out = np.empty(n + 2, dtype=_U64)  # update_into wants block_size - 1 spare bytes
        self._enc.update_into(_zeros(8 * n), memoryview(out).cast("B"))
        return out[:n]


_ZEROS = np.zeros(0, dtype=np.uint8)


def _zeros(nbytes: int) -> memoryview:
    """A read-only view of ``nbytes`` zero bytes (the plaintext whose encryption is the keystream), cached."""
    global _ZEROS
    if len(_ZEROS) < nbytes:
        _ZEROS = np.zeros(max(nbytes, 2 * len(_ZEROS)), dtype=np.uint8)
        _ZEROS.flags.writeable = False
    return memoryview(_ZEROS)[:nbytes]


# ---------------------------------------------------------------------------------- quantisation
def fixed_point_scale(ring: Ring, max_abs_sum: float) -> float:
    """Largest power-of-two scale such that any sum with ``|sum| <= max_abs_sum`` decodes without wrapping.

    ``max_abs_sum`` bounds the *aggregate* (e.g. ``num_clients * max_weight * clip`` for weighted updates);
    1 % of the range is kept free for the rounding error (at most 0.5 per client and element).
    """
    if max_abs_sum <= 0:
        raise ValueError(f"max_abs_sum must be > 0 (got {max_abs_sum})")
    limit = (ring.half - 1) * 0.99
    exponent = math.floor(math.log2(limit / max_abs_sum))
    if exponent < -64:
        raise ValueError(f"ring Z_{ring.modulus} cannot hold sums of magnitude {max_abs_sum}")
    return float(2.0**exponent)


def quantize(
    x: np.ndarray,
    ring: Ring,
    scale: float,
    clip: float | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Floats -> ring elements: clip to ``[-clip, clip]``, multiply by ``scale``, round, wrap.

    Rounding is to nearest, or unbiased stochastic rounding when ``rng`` is given (error averages out over
    many clients). A value whose scaled magnitude does not fit in the ring is an error, never a wrap.
    """
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("quantize: vector holds NaN or infinite values")
    if clip is not None:
        x = np.clip(x, -clip, clip)
    y = x * scale
    y = np.floor(y + rng.random(y.shape)) if rng is not None else np.rint(y)
    if y.size and float(np.abs(y).max()) >= min(ring.half, 2**62):
        raise ValueError(
            f"quantize: |x|·scale reaches {float(np.abs(y).max()):.3g}, beyond the ring's ±{ring.half}: "
            "lower the scale or clip"
        )
    return ring.from_signed(y.astype(np.int64))


def dequantize(q: np.ndarray, ring: Ring, scale: float) -> np.ndarray:
    """Ring elements (e.g. a secure sum) -> float64 in the units :func:`quantize` started from."""
    return ring.to_signed(ring.check(q, "dequantize")).astype(np.float64) / scale


def encode_weighted(
    update: np.ndarray, weight: float, ring: Ring, scale: float, clip: float | None = None
) -> np.ndarray:
    """One client's contribution to a weighted mean: ``quantize([weight · clip(update), weight])``."""
    u = np.asarray(update, dtype=np.float64).ravel()
    if clip is not None:
        u = np.clip(u, -clip, clip)
    return quantize(np.concatenate([weight * u, [weight]]), ring, scale)


def decode_weighted(total: np.ndarray, ring: Ring, scale: float) -> tuple[np.ndarray, float]:
    """Sum of :func:`encode_weighted` vectors -> (weighted mean of the updates, total weight)."""
    s = dequantize(total, ring, scale)
    weight = float(s[-1])
    if weight <= 0:
        raise ValueError(f"decode_weighted: total weight is {weight}; nothing was aggregated")
    return s[:-1] / weight, weight
