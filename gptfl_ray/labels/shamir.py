"""Shamir t-out-of-n secret sharing over the prime field ``GF(2^521 - 1)``.

Written by hand: it is ~60 lines of modular arithmetic on Python integers, and none of our dependencies ships
a maintained implementation (``cryptography`` has no secret sharing). Secrets are byte strings of up to 64
bytes (SecAgg shares 32-byte X25519 private keys and self-mask seeds); a leading ``0x01`` byte keeps leading
zeros. Share ``x`` coordinates are client ids + 1 (never 0, where the secret lives).

With more than ``threshold`` shares, :func:`combine` checks that all of them lie on one polynomial of degree
``< threshold``, so a tampered share is detected instead of silently yielding a wrong secret. With exactly
``threshold`` shares no check is possible (any ``threshold`` points define some polynomial).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**521 - 1  # Mersenne prime; 2^520 > any 65-byte encoded secret
MAX_SECRET_BYTES = 64
SHARE_BYTES = 66  # ceil(521 / 8)


class ShamirError(ValueError):
    """Shares are too few, malformed or inconsistent."""


def _encode(secret: bytes) -> int:
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"shamir: secret of {len(secret)} bytes exceeds {MAX_SECRET_BYTES}")
    return int.from_bytes(b"\x01" + secret, "big")


def _decode(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    if not raw or raw[0] != 1 or len(raw) > MAX_SECRET_BYTES + 1:
        raise ShamirError("shamir: reconstructed value is not a valid secret (tampered or mismatched shares)")
    return raw[1:]


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` for each ``x`` in ``xs``; any ``threshold`` of them recover it."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"shamir: threshold {threshold} must be in 1..{len(xs)} (number of shares)")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("shamir: share points must be distinct and nonzero")
    coeffs = [_encode(secret)] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def lagrange_coefficients(xs: Sequence[int], at: int = 0) -> list[int]:
    """Weights ``w_i`` with ``f(at) = sum_i w_i f(xs[i])`` for any polynomial of degree ``< len(xs)``."""
    nums, dens = [], []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        nums.append(num)
        dens.append(den)
    return [n * inv % PRIME for n, inv in zip(nums, _batch_inverse(dens), strict=True)]


def _batch_inverse(values: list[int]) -> list[int]:
    """Modular inverses of all ``values`` with one exponentiation (Montgomery's trick)."""
    prefix = [1]
    for v in values:
        prefix.append(prefix[-1] * v % PRIME)
    inv = pow(prefix[-1], PRIME - 2, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inv * prefix[i] % PRIME
        inv = inv * values[i] % PRIME
    return out


class Reconstructor:
    """Recovers many secrets shared among the same set of share holders (coefficients computed once).

    The first ``threshold`` points interpolate; every further point is a consistency check.
    """

    def __init__(self, xs: Sequence[int], threshold: int) -> None:
        xs = sorted(xs)
        if len(xs) < threshold:
            raise ShamirError(f"shamir: {len(xs)} shares, fewer than the threshold {threshold}")
        if len(set(xs)) != len(xs):
            raise ShamirError("shamir: duplicate share points")
        self.xs, self.threshold = xs, threshold
        self.basis = xs[:threshold]
        self.at_zero = lagrange_coefficients(self.basis, 0)
        self.checks = {x: lagrange_coefficients(self.basis, x) for x in xs[threshold:]}

    def combine(self, shares: Mapping[int, int]) -> bytes:
        if sorted(shares) != self.xs:
            raise ShamirError("shamir: shares do not come from the expected holders")
        ys = [shares[x] % PRIME for x in self.basis]
        for x, weights in self.checks.items():
            if sum(w * y for w, y in zip(weights, ys, strict=True)) % PRIME != shares[x] % PRIME:
                raise ShamirError(
                    f"shamir: share held by point {x} is inconsistent with the others (tampered)"
                )
        return _decode(sum(w * y for w, y in zip(self.at_zero, ys, strict=True)) % PRIME)


def combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """Recover the secret from ``{x: y}`` shares (at least ``threshold``; extras are checked)."""
    return Reconstructor(list(shares), threshold).combine(shares)


def share_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(b: bytes) -> int:
    if len(b) != SHARE_BYTES:
        raise ShamirError(f"shamir: share must be {SHARE_BYTES} bytes (got {len(b)})")
    y = int.from_bytes(b, "big")
    if y >= PRIME:
        raise ShamirError("shamir: share value outside the field")
    return y
