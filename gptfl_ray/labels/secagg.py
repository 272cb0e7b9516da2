"""Secure aggregation after Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning" (CCS 2017), semi-honest variant, as two transport-agnostic state machines.

Rounds (names follow the paper):

0. ``advertise_keys``  each client sends two X25519 public keys: ``enc`` (share encryption), ``mask`` (masks).
1. ``share_keys``      each client draws a self-mask seed ``b_u``, Shamir-shares ``b_u`` and its mask private key
                       ``s_u`` with threshold ``t``, and sends one AES-GCM ciphertext per peer (key: HKDF of the
                       X25519 ``enc`` agreement), routed by the server, which cannot read them.
2. ``masked_input``    ``y_u = x_u + PRG(b_u) + sum_v ±PRG(s_uv)`` with ``s_uv`` = HKDF(X25519(s_u, S_v));
                       pairwise masks cancel in the sum over all clients.
3. ``unmask``          given the survivors ``U3``, each client reveals shares of ``b_v`` for survivors and of
                       ``s_v`` for clients that dropped after key sharing -- never both for one client. The
                       server rebuilds the missing pairwise masks from the dropped clients' keys, strips the
                       self masks, and learns only ``sum_{u in U3} x_u``.

Every server stage needs at least ``threshold`` clients; fewer raises :class:`SecAggError` and no sum is
revealed. The server only ever accumulates masked vectors: it never holds an unmasked individual input.
All arithmetic is in a :class:`~gptfl_ray.labels.ring.Ring` (``Z_{2^64}`` by default).

Threat model: an honest-but-curious server (it follows the protocol and tries to learn from what it sees).
Two client-side rules bound what a server that lies about the survivor list ``U3`` can get:

- the threshold must exceed half of the roster (``2t > |U1|``; :func:`threshold_count`, checked by every
  client and the server) unless ``allow_minority`` is set. Each client answers ``unmask`` once, so a server
  that tells some clients "v survived" (getting ``b_v`` shares) and others "v dropped" (getting ``s_v``
  shares) collects at most ``|U2|`` shares in all: reaching ``t`` of both would need ``2t <= |U2|``.
- a client that sent its masked input refuses an ``unmask`` request whose survivor list leaves it out: it
  would reveal its own share of ``s_u`` after its masked ``y_u`` is in the server's hands.

There is no defence against a server that adds clients of its own (Sybils) or against colluding clients
beyond ``t - 1``; that is the malicious-server variant of the paper (signatures, a consistency round).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gptfl_ray.errors import UserError
from gptfl_ray.labels import shamir
from gptfl_ray.labels.ring import Ring

log = logging.getLogger(__name__)

STAGES = ("advertise_keys", "share_keys", "masked_input", "unmask")
DEFAULT_RING = Ring.bits(64)
_RAW = {"encoding": serialization.Encoding.Raw, "format": serialization.PublicFormat.Raw}
_ID = struct.Struct(">QQ")  # (sender, recipient) inside every share ciphertext
_NONCE = 12


class SecAggError(UserError, ValueError):
    """Secure aggregation cannot complete (too few clients, tampered messages); no sum is revealed.

    An expected outcome of a run, not a bug: the CLI shows it as one line."""


@dataclass(frozen=True)
class SecAggParams:
    """What every participant of one aggregation must agree on."""

    session: str  # domain separation, e.g. "labels" or "fl"
    round_id: int
    vector_len: int
    threshold: int
    ring: Ring = DEFAULT_RING
    allow_minority: bool = False  # accept 2·threshold <= roster size (see the module's threat model)

    def __post_init__(self) -> None:
        if self.vector_len <= 0:
            raise ValueError(f"secagg: vector_len must be > 0 (got {self.vector_len})")
        if self.threshold < 1:
            raise ValueError(f"secagg: threshold must be >= 1 (got {self.threshold})")

    @property
    def context(self) -> bytes:
        """Bound into every derived key and ciphertext so messages cannot be replayed across rounds."""
        r = self.ring.modulus
        return f"gptfl-secagg|{self.session}|{self.round_id}|{self.vector_len}|{self.threshold}|{r}".encode()


@dataclass(frozen=True)
class PublicKeys:
    """Round 0 message: a client's two X25519 public keys (raw 32 bytes each)."""

    cid: int
    enc_key: bytes
    mask_key: bytes

    @property
    def nbytes(self) -> int:
        return 8 + len(self.enc_key) + len(self.mask_key)


@dataclass(frozen=True)
class UnmaskShares:
    """Round 3 message: shares this client holds, keyed by the client they belong to."""

    cid: int
    mask_key_shares: dict[int, int]  # clients that dropped after key sharing -> share of their mask key
    seed_shares: dict[int, int]  # survivors -> share of their self-mask seed

    @property
    def nbytes(self) -> int:
        n = len(self.mask_key_shares) + len(self.seed_shares)
        return 8 + n * (8 + shamir.SHARE_BYTES)


@dataclass
class SecAggStats:
    """Bytes the server received from / sent to clients per stage, counted per logical client message."""

    bytes_in: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    bytes_out: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))

    @property
    def total_in(self) -> int:
        return sum(self.bytes_in.values())

    @property
    def total_out(self) -> int:
        return sum(self.bytes_out.values())


@dataclass
class SecAggResult:
    total: np.ndarray  # sum over `included` of the clients' ring vectors (uint64)
    included: list[int]  # clients whose input is in the sum (U3)
    dropped: list[int]  # clients that started but are not in the sum
    stats: SecAggStats


def _hkdf(shared: bytes, purpose: bytes, context: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose + b"|" + context).derive(shared)


def _pair_sign(u: int, v: int) -> int:
    """Client ``u`` adds ``+PRG(s_uv)`` if ``u < v`` and ``-PRG(s_uv)`` otherwise, so each pair cancels."""
    return 1 if u < v else -1


def _share_point(cid: int) -> int:
    return cid + 1  # Shamir x-coordinate; 0 is where the secret lives


def threshold_count(fraction: float, participants: int, allow_minority: bool = False) -> int:
    """Clients that must survive every stage: ``ceil(fraction · participants)``, at least 2 (the sum of one
    client is its input) and, unless ``allow_minority``, more than half of ``participants``."""
    t = max(2, math.ceil(round(fraction * participants, 9)))  # round: 0.7 · 10 is 7.000000000000001
    return t if allow_minority else max(t, participants // 2 + 1)


def _check_majority(params: SecAggParams, roster_size: int, who: str) -> None:
    if not params.allow_minority and 2 * params.threshold <= roster_size:
        raise SecAggError(
            f"{who}: threshold {params.threshold} is not more than half of the {roster_size} clients: a server "
            "that sends clients different survivor lists could unmask a client's input (allow_minority to accept)"
        )


def _need(n: int, threshold: int, stage: str) -> None:
    if n < threshold:
        raise SecAggError(
            f"secure aggregation aborted at {stage}: {n} clients left, fewer than the threshold {threshold}; "
            "no sum is revealed"
        )


# --------------------------------------------------------------------------------------------- client
class SecAggClient:
    """One client's side of one aggregation. Call the four rounds in order."""

    def __init__(self, cid: int, params: SecAggParams) -> None:
        if cid < 0:
            raise ValueError(f"secagg: client id must be >= 0 (got {cid})")
        self.cid, self.params = cid, params
        self._enc_sk = X25519PrivateKey.generate()
        self._mask_sk = X25519PrivateKey.generate()
        self._stage = 0
        self._roster: dict[int, PublicKeys] = {}
        self._seed = b""
        self._u2: set[int] = set()
        self._held_mask: dict[int, int] = {}  # owner -> share of owner's mask key
        self._held_seed: dict[int, int] = {}  # owner -> share of owner's self-mask seed
        self._share_keys: dict[int, bytes] = {}  # peer -> AES-GCM key (one X25519 agreement per peer)

    def _advance(self, stage: int) -> None:
        if self._stage != stage:
            raise SecAggError(f"client {self.cid}: {STAGES[stage]} called out of order")
        self._stage = stage + 1

    def advertise_keys(self) -> PublicKeys:
        self._advance(0)
        self._keys = PublicKeys(
            self.cid,
            self._enc_sk.public_key().public_bytes(**_RAW),
            self._mask_sk.public_key().public_bytes(**_RAW),
        )
        return self._keys

    def share_keys(self, roster: Mapping[int, PublicKeys]) -> dict[int, bytes]:
        """Round 1: encrypted Shamir shares of ``s_u`` and ``b_u`` for every other client in ``roster``."""
        self._advance(1)
        p = self.params
        if roster.get(self.cid) != self._keys:
            raise SecAggError(f"client {self.cid}: the roster does not carry this client's own keys")
        _need(len(roster), p.threshold, "share_keys")
        _check_majority(p, len(roster), f"client {self.cid}")
        keys = [k for pk in roster.values() for k in (pk.enc_key, pk.mask_key)]
        if len(set(keys)) != len(keys):
            raise SecAggError(f"client {self.cid}: duplicate public keys in the roster")
        self._roster = dict(roster)
        self._seed = secrets.token_bytes(32)
        points = [_share_point(v) for v in sorted(roster)]
        mask_raw = self._mask_sk.private_bytes_raw()
        mask_shares = shamir.split(mask_raw, points, p.threshold)
        seed_shares = shamir.split(self._seed, points, p.threshold)
        self._held_mask[self.cid] = mask_shares[_share_point(self.cid)]
        self._held_seed[self.cid] = seed_shares[_share_point(self.cid)]
        out = {}
        for v, pk in roster.items():
            if v == self.cid:
                continue
            key = self._share_keys[v] = _hkdf(
                self._enc_sk.exchange(X25519PublicKey.from_public_bytes(pk.enc_key)), b"share", p.context
            )
            ids = _ID.pack(self.cid, v)
            plain = ids + shamir.share_to_bytes(mask_shares[_share_point(v)])
            plain += shamir.share_to_bytes(seed_shares[_share_point(v)])
            nonce = os.urandom(_NONCE)
            out[v] = nonce + AESGCM(key).encrypt(nonce, plain, p.context + ids)
        return out

    def masked_input(self, inbox: Mapping[int, bytes], x: np.ndarray) -> np.ndarray:
        """Round 2: decrypt the shares addressed to us; return ``x`` masked (wire dtype of the ring)."""
        self._advance(2)
        p, ring = self.params, self.params.ring
        u2 = set(inbox) | {self.cid}
        if not u2 <= set(self._roster):
            raise SecAggError(f"client {self.cid}: shares from clients outside the roster")
        _need(len(u2), p.threshold, "masked_input")
        for u, blob in inbox.items():
            self._receive_share(u, blob)
        x = ring.check(x, f"client {self.cid} input")
        if x.shape != (p.vector_len,):
            raise SecAggError(f"client {self.cid}: input has shape {x.shape}, expected ({p.vector_len},)")
        self._u2 = u2
        y = ring.add(x, ring.random(self._seed, p.vector_len))
        plus, minus = ring.zeros(p.vector_len), ring.zeros(p.vector_len)
        for v in sorted(u2 - {self.cid}):
            shared = self._mask_sk.exchange(X25519PublicKey.from_public_bytes(self._roster[v].mask_key))
            mask = ring.random(_hkdf(shared, b"mask", p.context), p.vector_len)
            acc = plus if _pair_sign(self.cid, v) > 0 else minus
            ring.add(acc, mask, out=acc)
        ring.add(y, plus, out=y)
        ring.sub(y, minus, out=y)
        return ring.pack(y)

    def _receive_share(self, sender: int, blob: bytes) -> None:
        p = self.params
        key = self._share_keys[sender]  # the same agreement X25519(c_u, C_v) as when we sent ours
        ids = _ID.pack(sender, self.cid)
        try:
            plain = AESGCM(key).decrypt(blob[:_NONCE], blob[_NONCE:], p.context + ids)
        except InvalidTag:
            raise SecAggError(
                f"client {self.cid}: the share from client {sender} failed authentication (tampered or misrouted)"
            ) from None
        s = shamir.SHARE_BYTES
        body = plain[_ID.size :]
        self._held_mask[sender] = shamir.share_from_bytes(body[:s])
        self._held_seed[sender] = shamir.share_from_bytes(body[s:])

    def unmask(self, survivors: Sequence[int]) -> UnmaskShares:
        """Round 3: shares of ``b_v`` for survivors, of ``s_v`` for clients that dropped after key sharing.

        Answered once (a second request is out of order), so no peer ever gets both its shares revealed by
        this client; a survivor list without this client is refused: it sent its masked input, and revealing
        its own ``s_u`` share would help unmask it.
        """
        self._advance(3)
        u3 = set(survivors)
        if not u3 <= self._u2:
            raise SecAggError(f"client {self.cid}: survivor list names clients that never shared keys")
        if self.cid not in u3:
            raise SecAggError(
                f"client {self.cid}: the survivor list leaves out this client, which sent its masked input; "
                "refusing to reveal its own mask-key share"
            )
        _need(len(u3), self.params.threshold, "unmask")
        return UnmaskShares(
            cid=self.cid,
            mask_key_shares={v: self._held_mask[v] for v in sorted(self._u2 - u3)},
            seed_shares={v: self._held_seed[v] for v in sorted(u3)},
        )


# --------------------------------------------------------------------------------------------- server
class SecAggServer:
    """The server's side: routes messages, sums masked inputs, removes the masks. Sees no individual input."""

    def __init__(self, params: SecAggParams, expected: Sequence[int] | None = None) -> None:
        self.params = params
        self.stats = SecAggStats()
        self._expected = set(expected) if expected is not None else None
        self._roster: dict[int, PublicKeys] = {}
        self._u2: list[int] = []
        self._u3: set[int] = set()
        self._sum = params.ring.zeros(params.vector_len)
        self._closed = False

    @property
    def roster(self) -> dict[int, PublicKeys]:
        return dict(self._roster)

    def collect_keys(self, keys: Mapping[int, PublicKeys]) -> dict[int, PublicKeys]:
        """Round 0 -> the roster ``U1`` broadcast to every client in it."""
        for cid, pk in keys.items():
            if pk.cid != cid or len(pk.enc_key) != 32 or len(pk.mask_key) != 32:
                raise SecAggError(f"secure aggregation: malformed public keys from client {cid}")
            self.stats.bytes_in["advertise_keys"] += pk.nbytes
        self._roster = dict(sorted(keys.items()))
        _need(len(self._roster), self.params.threshold, "advertise_keys")
        _check_majority(self.params, len(self._roster), "secure aggregation")
        self.stats.bytes_out["advertise_keys"] += len(self._roster) * sum(pk.nbytes for pk in keys.values())
        return self.roster

    def route_shares(self, outboxes: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Round 1 -> per-recipient inboxes for ``U2`` (the clients whose shares arrived complete)."""
        u1 = set(self._roster)
        u2 = []
        for cid, box in sorted(outboxes.items()):
            self.stats.bytes_in["share_keys"] += sum(len(b) for b in box.values())
            if cid in u1 and set(box) == u1 - {cid}:
                u2.append(cid)
            else:
                log.warning("secagg: client %d sent shares for the wrong set of peers; dropped", cid)
        _need(len(u2), self.params.threshold, "share_keys")
        self._u2 = u2
        inboxes = {v: {u: outboxes[u][v] for u in u2 if u != v} for v in u2}
        self.stats.bytes_out["share_keys"] += sum(len(b) for box in inboxes.values() for b in box.values())
        return inboxes

    def add_masked_input(self, cid: int, y: np.ndarray) -> None:
        """Round 2: fold one masked vector into the running sum (the only place inputs arrive)."""
        if self._closed or cid not in self._u2 or cid in self._u3:
            raise SecAggError(f"secure aggregation: unexpected masked input from client {cid}")
        y = self.params.ring.check(y, f"masked input of client {cid}")
        if y.shape != (self.params.vector_len,):
            raise SecAggError(f"secure aggregation: masked input of client {cid} has shape {y.shape}")
        self.params.ring.add(self._sum, y, out=self._sum)
        self._u3.add(cid)
        self.stats.bytes_in["masked_input"] += self.params.ring.nbytes(self.params.vector_len)

    def close_masked_inputs(self) -> list[int]:
        """End of round 2 -> the survivor list ``U3`` sent to every survivor."""
        _need(len(self._u3), self.params.threshold, "masked_input")
        self._closed = True
        u3 = sorted(self._u3)
        self.stats.bytes_out["masked_input"] += 8 * len(u3) * len(u3)
        return u3

    def unmask(self, responses: Mapping[int, UnmaskShares]) -> SecAggResult:
        """Round 3: rebuild dropped clients' pairwise masks and survivors' self masks; return the sum."""
        p, ring = self.params, self.params.ring
        u3 = sorted(self._u3)
        dropped_after_sharing = sorted(set(self._u2) - self._u3)
        valid = {}
        for cid, r in responses.items():
            self.stats.bytes_in["unmask"] += r.nbytes
            ok = r.cid == cid and cid in self._u3
            if ok and sorted(r.seed_shares) == u3 and sorted(r.mask_key_shares) == dropped_after_sharing:
                valid[cid] = r
            else:
                log.warning("secagg: malformed unmask response from client %d; ignored", cid)
        _need(len(valid), p.threshold, "unmask")
        rec = shamir.Reconstructor([_share_point(c) for c in valid], p.threshold)
        total = self._sum.copy()
        for v in u3:
            seed = self._combine(
                rec, {_share_point(c): r.seed_shares[v] for c, r in valid.items()}, v, "seed"
            )
            ring.sub(total, ring.random(seed, p.vector_len), out=total)
        for v in dropped_after_sharing:
            raw = self._combine(
                rec, {_share_point(c): r.mask_key_shares[v] for c, r in valid.items()}, v, "key"
            )
            try:
                sk = X25519PrivateKey.from_private_bytes(raw)
            except ValueError:
                raise SecAggError(
                    f"secure aggregation: rebuilt mask key of client {v} is malformed"
                ) from None
            if sk.public_key().public_bytes(**_RAW) != self._roster[v].mask_key:
                raise SecAggError(
                    f"secure aggregation: rebuilt mask key of dropped client {v} does not match its public key "
                    "(tampered shares)"
                )
            for u in u3:
                shared = sk.exchange(X25519PublicKey.from_public_bytes(self._roster[u].mask_key))
                mask = ring.random(_hkdf(shared, b"mask", p.context), p.vector_len)
                # survivor u added sign(u, v) * mask; take it back out
                (ring.sub if _pair_sign(u, v) > 0 else ring.add)(total, mask, out=total)
        started = self._expected if self._expected is not None else set(self._roster)
        return SecAggResult(total=total, included=u3, dropped=sorted(started - self._u3), stats=self.stats)

    @staticmethod
    def _combine(rec: shamir.Reconstructor, shares: dict[int, int], owner: int, what: str) -> bytes:
        try:
            return rec.combine(shares)
        except shamir.ShamirError as err:
            raise SecAggError(
                f"secure aggregation: cannot rebuild the {what} of client {owner}: {err}"
            ) from None


# ------------------------------------------------------------------------------------- local driver
def secure_sum_local(
    vectors: Mapping[int, np.ndarray],
    threshold: int,
    ring: Ring = DEFAULT_RING,
    *,
    drop_at: Mapping[int, str] | None = None,
    session: str = "local",
    round_id: int = 0,
    allow_minority: bool = False,
) -> SecAggResult:
    """Run the whole protocol in-process (tests, single-machine use).

    ``drop_at[cid] = stage`` makes client ``cid`` stop answering from that stage on, e.g. ``"masked_input"``
    = it dropped after key sharing.
    """
    drop_at = dict(drop_at or {})
    for cid, stage in drop_at.items():
        if stage not in STAGES:
            raise ValueError(f"drop_at[{cid}]: unknown stage {stage!r} (one of {', '.join(STAGES)})")
    if not vectors:
        raise ValueError("secure_sum_local: no client vectors")
    vector_len = len(next(iter(vectors.values())))
    params = SecAggParams(session, round_id, vector_len, threshold, ring, allow_minority)

    def alive(cid: int, stage: str) -> bool:
        return cid not in drop_at or STAGES.index(stage) < STAGES.index(drop_at[cid])

    clients = {cid: SecAggClient(cid, params) for cid in vectors}
    server = SecAggServer(params, expected=list(vectors))
    roster = server.collect_keys(
        {c: clients[c].advertise_keys() for c in clients if alive(c, "advertise_keys")}
    )
    inboxes = server.route_shares(
        {c: clients[c].share_keys(roster) for c in roster if alive(c, "share_keys")}
    )
    for c in inboxes:
        if alive(c, "masked_input"):
            server.add_masked_input(c, clients[c].masked_input(inboxes[c], vectors[c]))
    survivors = server.close_masked_inputs()
    return server.unmask({c: clients[c].unmask(survivors) for c in survivors if alive(c, "unmask")})
