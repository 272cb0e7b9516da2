"""Secure aggregation of FL updates (``fl.secure_aggregation: true``): the server learns only the round's sum.

The protocol is Bonawitz et al. 2017 (:mod:`gptfl_ray.labels.secagg`), driven by
:func:`~gptfl_ray.labels.secagg_ray.secure_sum` over the *same* client actors that train. One round:

1. Each sampled client trains in an actor (:meth:`SecureClientMixin.train_secure`). The actor encodes the
   update as fixed-point ring elements ``[w·Δ, w, n, n·loss, clipped fraction, norm-clipped]`` (w: the
   strategy's aggregation weight, n: sample count) and *keeps* it; the task returns only its run time, or a
   rejection reason when the update is unusable (NaN/Inf), in which case the client sits the round out.
2. The server runs SecAgg over the clients whose actors hold an encoding (participant id = position in the
   round, so a client sampled twice with ``fl.with_replacement`` takes part twice): public keys, encrypted
   Shamir shares, masked vectors, unmasking. Masked vectors and their sum are all the server ever holds.
   Clients whose actor dies after key sharing are recovered from the survivors' shares (their pairwise masks
   are rebuilt and removed); with fewer than the threshold left, no sum is revealed and the round is
   skipped with a ``round_skipped`` event. Dead actors are replaced before the next round.
3. The server decodes the sum into ``Σ w·Δ / Σ w`` and applies the strategy's server update (FedAvg, FedProx,
   FedAvgM, FedAdam, FedYogi, FedAdagrad; weighted or not). ``train_loss`` is ``Σ n·loss / Σ n``.

What the server cannot do any more, and what replaces it:

- reject updates by norm: ``fl.max_update_norm`` is enforced by the *client*, which scales its update down to
  that L2 norm before masking (the round's ``secagg.norm_clipped`` counts such clients);
- check updates for NaN/Inf: the client withholds such an update itself (an ``update_rejected`` event);
- gradient diversity needs individual updates: ``grad_diversity`` is ``null``;
- SCAFFOLD's per-client control variates ``c_i <- c_i + Δc_i`` need each client's ``Δc_i`` on the server
  (this runtime keeps them there): rejected with ``fl.secure_aggregation``, as is any strategy whose server half
  reads single clients' results (``Strategy.needs_individual_results``: FedDF's and Fed-ET's ensembles, DS-FL's
  soft labels).

Quantisation: every coordinate is clipped (``fl.secagg_clip`` for trainable parameters,
``fl.secagg_buffer_clip`` for float buffers such as BatchNorm statistics), multiplied by its weight and by a
power-of-two scale, and rounded to the nearest ring element. Scales come from
:func:`~gptfl_ray.labels.ring.fixed_point_scale` with the worst case of the round -- every sampled client at
the largest weight any client can have, every coordinate at its clip -- so the sum cannot wrap. The weight
bound is public: the largest client's sample count (here read from the partition; a deployment configures
it). The decoded mean is off by at most ``included · 0.5 / (scale · Σ w)`` per coordinate, reported per round
as ``secagg.max_quant_error``; ``secagg.clipped_fraction`` reports how many coordinates the clip changed.

Communication: ``bytes_up`` is everything clients send during the protocol (keys, encrypted shares, masked
vectors of ``vector_len`` ring elements at 4 or 8 bytes, unmasking shares); ``bytes_down`` adds what the
server sends (roster, routed shares, survivor list) to the weights broadcast. An aggregation that aborts
(below threshold) is counted as 0 protocol bytes: the driver does not return the traffic of an aborted run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gptfl_ray.config import ConfigError, FLConfig
from gptfl_ray.fl.client import FLClient, Shard
from gptfl_ray.fl.server import RoundSum
from gptfl_ray.fl.strategies import Strategy
from gptfl_ray.labels.ring import Ring, dequantize, fixed_point_scale, quantize
from gptfl_ray.labels.secagg import SecAggError, threshold_count
from gptfl_ray.labels.secagg_ray import SecAggHost, secure_sum

if TYPE_CHECKING:
    from gptfl_ray.fl.server import FederatedServer

log = logging.getLogger(__name__)

SESSION = "fl"
TAIL = ("weight", "samples", "loss_sum", "clipped_fraction", "norm_clipped")  # after the model vector
LOSS_CAP = 100.0  # a client's mean training loss is capped here inside the sum (a metric only)


# -------------------------------------------------------------------------------------------- config
def check_secure_config(fl: FLConfig, strategy: Strategy) -> None:
    """Fail fast, in one line naming ``fl.secure_aggregation``, on settings secure aggregation cannot serve."""
    if fl.mode != "federated":
        return  # the client-isolated control aggregates nothing
    if type(strategy).needs_individual_results():
        from gptfl_ray.fl.strategies import STRATEGIES

        ok = [name for name, cls in STRATEGIES.items() if not cls.needs_individual_results()]
        raise ConfigError(
            f"fl.secure_aggregation: not supported with fl.strategy.name={strategy.name!r}: it needs each "
            "client's own upload, model or state on the server, which secure aggregation hides; use "
            + ", ".join(ok)
        )
    if fl.clients_per_round < 2:
        raise ConfigError(
            "fl.secure_aggregation: needs fl.clients_per_round >= 2 (the sum of one client is its update)"
        )


# -------------------------------------------------------------------------------------------- codec
@dataclass(frozen=True)
class UpdateCodec:
    """Fixed-point encoding of one client's contribution into ``Z_2^ring_bits`` (the round's public params).

    Vector layout: ``[w·Δ_params | w·Δ_buffers | w, n, n·loss, clipped fraction, norm clipped]``; each
    segment has its own power-of-two scale, sized so that the sum over ``participants`` cannot wrap.
    """

    ring_bits: int
    num_trainable: int
    size: int  # model vector length (trainable parameters + float buffers)
    clip: float
    buffer_clip: float
    max_norm: float | None
    max_weight: float  # public bounds the scales assume; a client beyond them is refused, never wrapped
    max_samples: int
    scales: tuple[float, ...]  # params, buffers, then one per TAIL entry

    @classmethod
    def for_round(
        cls,
        fl: FLConfig,
        *,
        num_trainable: int,
        size: int,
        participants: int,
        max_weight: float,
        max_samples: int,
    ) -> UpdateCodec:
        ring = Ring.bits(fl.secagg_ring_bits)
        clip, buffer_clip = fl.secagg_clip, fl.secagg_buffer_clip
        if fl.max_update_norm is not None:  # |Δ_j| <= ‖Δ‖ <= max_norm: a tighter range, finer scale
            clip, buffer_clip = min(clip, fl.max_update_norm), min(buffer_clip, fl.max_update_norm)
        bounds = (
            max_weight * clip,
            max_weight * buffer_clip,
            max_weight,
            max_samples,
            max_samples * LOSS_CAP,
            1.0,
            1.0,
        )
        return cls(
            ring_bits=fl.secagg_ring_bits,
            num_trainable=num_trainable,
            size=size,
            clip=clip,
            buffer_clip=buffer_clip,
            max_norm=fl.max_update_norm,
            max_weight=max_weight,
            max_samples=max_samples,
            scales=tuple(fixed_point_scale(ring, participants * b) for b in bounds),
        )

    @property
    def ring(self) -> Ring:
        return Ring.bits(self.ring_bits)

    @property
    def vector_len(self) -> int:
        return self.size + len(TAIL)

    def _scale_vector(self) -> np.ndarray:
        counts = (self.num_trainable, self.size - self.num_trainable, *([1] * len(TAIL)))
        return np.repeat(np.asarray(self.scales), counts)

    def encode(self, delta: np.ndarray, weight: float, num_samples: int, loss: float) -> np.ndarray:
        """Client side: one update -> packed ring vector. Raises ValueError on NaN/Inf."""
        d = np.array(delta, dtype=np.float64).ravel()
        if d.shape != (self.size,):
            raise ValueError(f"update has shape {d.shape}, expected ({self.size},)")
        if not (np.isfinite(d).all() and math.isfinite(loss)):
            raise ValueError("non-finite values (NaN/Inf)")
        if not (0 <= weight <= self.max_weight and 0 <= num_samples <= self.max_samples):
            raise ValueError(
                f"weight {weight:g} / {num_samples} samples outside the round's bounds "
                f"[0, {self.max_weight:g}] / [0, {self.max_samples}]"
            )
        norm_clipped = 0.0
        if self.max_norm is not None:
            norm = float(np.linalg.norm(d))
            if norm > self.max_norm:
                d *= self.max_norm / norm
                norm_clipped = 1.0
        n = self.num_trainable
        clipped = np.count_nonzero(np.abs(d[:n]) > self.clip) + np.count_nonzero(
            np.abs(d[n:]) > self.buffer_clip
        )
        np.clip(d[:n], -self.clip, self.clip, out=d[:n])
        np.clip(d[n:], -self.buffer_clip, self.buffer_clip, out=d[n:])
        tail = [weight, num_samples, num_samples * min(loss, LOSS_CAP), clipped / self.size, norm_clipped]
        values = np.concatenate([weight * d, tail])
        ring = self.ring
        return ring.pack(quantize(values, ring, self._scale_vector()))  # type: ignore[arg-type]  # per element

    def decode(self, total: np.ndarray, included: int) -> SecureTotals:
        """Server side: the ring sum of ``included`` encodings -> the round's aggregate."""
        s = dequantize(total, self.ring, self._scale_vector())  # type: ignore[arg-type]  # per element
        tail = dict(zip(TAIL, s[self.size :].tolist(), strict=True))
        weight = tail["weight"]
        update_scale = min(self.scales[:2]) if self.size > self.num_trainable else self.scales[0]
        return SecureTotals(
            mean=s[: self.size] / weight if weight > 0 else None,
            weight=weight,
            samples=tail["samples"],
            train_loss=tail["loss_sum"] / tail["samples"] if tail["samples"] > 0 else None,
            clipped_fraction=tail["clipped_fraction"] / included,
            norm_clipped=round(tail["norm_clipped"]),
            max_quant_error=included * 0.5 / (update_scale * weight) if weight > 0 else math.inf,
        )


@dataclass(frozen=True)
class SecureTotals:
    mean: np.ndarray | None  # Σ w·Δ / Σ w, float64 (None when Σ w = 0)
    weight: float
    samples: float
    train_loss: float | None
    clipped_fraction: float  # mean over included clients of the fraction of coordinates clipped
    norm_clipped: int  # clients that scaled their update down to fl.max_update_norm
    max_quant_error: float  # bound on |decoded mean - exact mean of the clipped updates| per coordinate


# -------------------------------------------------------------------------------------------- client
class SecureClientMixin(SecAggHost):
    """Client-actor half: train, encode and keep the update; answer the SecAgg rounds from what it keeps.

    Mix into an :class:`~gptfl_ray.fl.client.FLClient` (see :class:`SecureFLClient`). Updates are keyed by
    ``(round, participant)``; they never leave the actor unmasked.
    """

    def _held(self) -> dict[tuple[int, int], np.ndarray]:
        if not hasattr(self, "_secure_updates"):
            self._secure_updates: dict[tuple[int, int], np.ndarray] = {}
        return self._secure_updates

    def train_secure(
        self,
        weights: np.ndarray,
        shard: Shard,
        broadcast: dict[str, np.ndarray] | None,
        state: dict[str, Any] | None,
        seed: int,
        round_id: int,
        participant: int,
        codec: UpdateCodec,
    ) -> dict[str, Any]:
        """Local training as :meth:`FLClient.train`; the encoded update stays here for :meth:`secagg_vector`."""
        t0 = time.perf_counter()
        held = self._held()
        for key in [k for k in held if k[0] < round_id]:  # an earlier round that never aggregated
            del held[key]
        w, ctx, steps, loss = self._fit(
            weights, shard, self.strategy, broadcast, state, seed, self.spec.local.epochs
        )
        self.strategy.client_end(ctx, self.flat.param.data, steps)  # no extra uploads (check_secure_config)
        delta = (self.flat.vector() - w).cpu().numpy()
        n = len(shard[1])
        try:
            held[(round_id, participant)] = codec.encode(delta, self.strategy.aggregation_weight(n), n, loss)
            rejected = None
        except ValueError as err:  # the client sits this round out and says why (no values disclosed)
            rejected = f"update: {err}"
        return {"rejected": rejected, "seconds": time.perf_counter() - t0}

    def secagg_vector(self, cid: int, round_id: int) -> np.ndarray | None:
        return self._held().pop((round_id, cid), None)

    def secagg_forget(self, session: str, round_id: int) -> None:
        super().secagg_forget(session, round_id)
        if session == SESSION:
            for key in [k for k in self._held() if k[0] == round_id]:
                del self._held()[key]


class SecureFLClient(SecureClientMixin, FLClient):
    """The FL client actor with secure aggregation (what ``run_federated`` uses when it is on)."""


def secure_client_class(client_cls: type[FLClient]) -> type[FLClient]:
    """The actor class for a secure run: ``SecureFLClient`` for the default, else ``client_cls`` itself."""
    if client_cls is FLClient:
        return SecureFLClient
    if not issubclass(client_cls, SecureClientMixin):
        raise TypeError(
            f"client_cls={client_cls.__name__}: with fl.secure_aggregation it must subclass SecureFLClient"
        )
    return client_cls


# -------------------------------------------------------------------------------------------- server
class SecureAggregation:
    """Server half for one round (replaces :class:`~gptfl_ray.fl.server.PlainAggregation`).

    Holds actor handles, never updates: the only vectors it receives are SecAgg's masked inputs, inside
    :func:`secure_sum`, which returns their unmasked *sum*.
    """

    method = "train_secure"

    def __init__(
        self,
        server: FederatedServer,
        rnd: int,
        sampled: list[int],
        size: int,
        start: torch.Tensor | None = None,  # unused: strategies that need individual models are refused
    ):
        fl, strategy = server.fl, server.strategy
        self.server, self.rnd, self.sampled = server, rnd, sampled
        self.codec = UpdateCodec.for_round(
            fl,
            num_trainable=strategy.num_trainable,
            size=size,
            participants=len(sampled),
            max_weight=max(strategy.aggregation_weight(n) for n in server.sizes),
            max_samples=max(server.sizes),
        )
        self.hosts: dict[int, Any] = {}  # participant (position in the round) -> actor holding its update

    def task_args(self, slot: int, args: tuple) -> tuple:
        return (*args, self.rnd, slot, self.codec)

    def lost(self, slot: int) -> None:
        pass

    def receive(self, slot: int, cid: int, value: dict[str, Any], actor: Any) -> str | None:
        if value["rejected"]:
            return value["rejected"]
        self.hosts[slot] = actor
        return None

    def finish(self) -> RoundSum:
        fl, codec = self.server.fl, self.codec
        n = len(self.hosts)
        threshold = threshold_count(fl.secagg_threshold, n, fl.secagg_allow_minority_threshold)
        info: dict[str, Any] = {
            "participants": n,
            "threshold": threshold,
            "ring_bits": codec.ring_bits,
            "vector_len": codec.vector_len,
        }
        empty = RoundSum(0, None, None, None, 0, 0, record={"secagg": info})
        if n == 0:
            return empty
        t0 = time.perf_counter()
        try:
            result = secure_sum(
                self.hosts,
                round_id=self.rnd,
                vector_len=codec.vector_len,
                threshold=threshold,
                ring=codec.ring,
                session=SESSION,
                timeout_s=fl.secagg_timeout_s,
                allow_minority=fl.secagg_allow_minority_threshold,
            )
        except SecAggError as err:
            info.update(seconds=time.perf_counter() - t0, included=0)
            self._replace_dead()
            empty.skip_reason = f"secure aggregation: {err}"
            return empty
        info["seconds"] = time.perf_counter() - t0
        dropped = [self.sampled[p] for p in result.dropped]
        if dropped:
            self.server.on_event({"event": "secagg_dropout", "round": self.rnd, "clients": dropped})
            self._replace_dead()
        totals = codec.decode(result.total, len(result.included))
        if totals.max_quant_error > 1e-3 * codec.clip:
            log.warning(
                "secure aggregation round %d: fixed-point error up to %.2g per coordinate; "
                "consider fl.secagg_ring_bits: 64 or a smaller fl.secagg_clip",
                self.rnd,
                totals.max_quant_error,
            )
        stats = result.stats
        info.update(
            included=len(result.included),
            dropped_clients=dropped,
            bytes_in=stats.bytes_in,
            bytes_out=stats.bytes_out,
            max_quant_error=totals.max_quant_error,
            clipped_fraction=totals.clipped_fraction,
            norm_clipped=totals.norm_clipped,
        )
        mean = None if totals.mean is None else torch.from_numpy(totals.mean.astype(np.float32))
        return RoundSum(
            count=len(result.included),
            mean=mean,
            train_loss=totals.train_loss,
            grad_diversity=None,  # needs individual updates
            params_up=len(result.included) * codec.vector_len,
            bytes_up=stats.total_in,
            bytes_down=stats.total_out,
            skip_reason=None if mean is not None else "secure aggregation: total weight is 0",
            record={"secagg": info},
        )

    def _replace_dead(self) -> None:
        """Actors that died (or hung) during the protocol are replaced before the next round's dispatch.

        A healthy actor is idle now and answers the ping at once; one still busy after the stage deadline
        (its clients already dropped) is hung and replaced."""
        from gptfl_ray.fl.pool import PING_TIMEOUT_S

        self.server.pool.replace_dead(min(self.server.fl.secagg_timeout_s, PING_TIMEOUT_S))
