"""Secure aggregation over Ray actors.

:class:`SecAggHost` is a mixin for any Ray actor class that serves many virtual clients (an FL actor, the
label actors): it keeps one :class:`~gptfl_ray.labels.secagg.SecAggClient` per ``(session, round, cid)`` and
answers each protocol round for a batch of its clients in one call. The subclass supplies the plaintext with
``secagg_vector(cid, round_id)``; it never leaves the actor unmasked.

:func:`secure_sum` is the server-side driver: it runs the four rounds with one call per host per round,
routes messages through a :class:`~gptfl_ray.labels.secagg.SecAggServer`, and treats a host that dies, raises
or misses ``timeout_s`` as the dropout of all its clients from that round on.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gptfl_ray.labels.ring import Ring
from gptfl_ray.labels.secagg import (
    DEFAULT_RING,
    PublicKeys,
    SecAggClient,
    SecAggParams,
    SecAggResult,
    SecAggServer,
    UnmaskShares,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0  # per-stage deadline when the caller gives none: no stage waits forever


class SecAggHost:
    """Mixin for a Ray actor hosting many virtual clients' SecAgg states, keyed by client id."""

    def secagg_vector(self, cid: int, round_id: int) -> np.ndarray | None:
        """Client ``cid``'s plaintext for this round as ring elements (uint64, length ``vector_len``).

        Return ``None`` when the client cannot contribute this round: it then drops after key sharing.
        """
        raise NotImplementedError

    def _secagg_states(self) -> dict[tuple[str, int, int], SecAggClient]:
        if not hasattr(self, "_secagg_clients"):
            self._secagg_clients: dict[tuple[str, int, int], SecAggClient] = {}
        return self._secagg_clients

    def secagg_advertise(self, params: SecAggParams, cids: Sequence[int]) -> dict[int, PublicKeys]:
        states = self._secagg_states()
        out = {}
        for cid in cids:
            client = states[(params.session, params.round_id, cid)] = SecAggClient(cid, params)
            out[cid] = client.advertise_keys()
        return out

    def secagg_share_keys(
        self, params: SecAggParams, roster: Mapping[int, PublicKeys], cids: Sequence[int]
    ) -> dict[int, dict[int, bytes]]:
        states = self._secagg_states()
        return {cid: states[(params.session, params.round_id, cid)].share_keys(roster) for cid in cids}

    def secagg_masked_input(
        self, params: SecAggParams, inboxes: Mapping[int, Mapping[int, bytes]]
    ) -> dict[int, np.ndarray]:
        states = self._secagg_states()
        out = {}
        for cid, inbox in inboxes.items():
            x = self.secagg_vector(cid, params.round_id)
            if x is not None:
                out[cid] = states[(params.session, params.round_id, cid)].masked_input(inbox, x)
        return out

    def secagg_unmask(
        self, params: SecAggParams, survivors: Sequence[int], cids: Sequence[int]
    ) -> dict[int, UnmaskShares]:
        states = self._secagg_states()
        out = {cid: states.pop((params.session, params.round_id, cid)).unmask(survivors) for cid in cids}
        self.secagg_forget(params.session, params.round_id)
        return out

    def secagg_forget(self, session: str, round_id: int) -> None:
        """Drop every state of one aggregation (after it ends or aborts)."""
        states = self._secagg_states()
        for key in [k for k in states if k[:2] == (session, round_id)]:
            del states[key]


def _gather(calls: dict[Any, Any], timeout_s: float, stage: str) -> dict[Any, Any]:
    """``ray.get`` each host's call. Hosts that died or missed the deadline are left out (their clients
    drop); an exception raised by host code is a bug or bad input and propagates."""
    import ray

    if not calls:
        return {}
    refs = list(calls.values())
    done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in pending:
        try:
            ray.cancel(ref)
        except Exception as err:  # cancelling is only a courtesy to the slow host
            log.debug("secagg %s: cancel failed: %s", stage, err)
    out = {}
    for host, ref in calls.items():
        if ref not in done:
            log.warning("secagg %s: a host missed the %ss deadline; its clients drop", stage, timeout_s)
            continue
        try:
            out[host] = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            log.warning("secagg %s: a host died (%s); its clients drop", stage, type(err).__name__)
        except ray.exceptions.RayTaskError as err:
            log.debug("secagg %s: host raised:\n%s", stage, err)
            raise (err.cause if isinstance(err.cause, Exception) else err) from None
    return out


def secure_sum(
    hosts: Mapping[int, Any],
    round_id: int,
    vector_len: int,
    threshold: int,
    *,
    ring: Ring = DEFAULT_RING,
    session: str = "secagg",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    allow_minority: bool = False,
) -> SecAggResult:
    """Secure sum of the vectors of clients ``hosts`` (cid -> the Ray actor hosting it).

    Returns the ring sum over the surviving clients (``result.included``); raises
    :class:`~gptfl_ray.labels.secagg.SecAggError` when fewer than ``threshold`` clients remain at any stage.
    """
    import ray

    params = SecAggParams(session, round_id, vector_len, threshold, ring, allow_minority)
    by_host: dict[Any, list[int]] = defaultdict(list)
    for cid, handle in sorted(hosts.items()):
        by_host[handle].append(cid)
    server = SecAggServer(params, expected=list(hosts))

    def merge(results: dict[Any, dict[int, Any]]) -> dict[int, Any]:
        return {cid: msg for per_host in results.values() for cid, msg in per_host.items()}

    try:
        keys = merge(
            _gather(
                {h: h.secagg_advertise.remote(params, c) for h, c in by_host.items()}, timeout_s, "advertise"
            )
        )
        roster = server.collect_keys(keys)
        roster_ref = ray.put(roster)  # one copy in the object store, shared by every host
        live = {h: [c for c in cids if c in roster] for h, cids in by_host.items()}
        outboxes = merge(
            _gather(
                {h: h.secagg_share_keys.remote(params, roster_ref, c) for h, c in live.items() if c},
                timeout_s,
                "share_keys",
            )
        )
        inboxes = server.route_shares(outboxes)
        calls = {}
        for h, cids in by_host.items():
            mine = {c: inboxes[c] for c in cids if c in inboxes}
            if mine:
                calls[h] = h.secagg_masked_input.remote(params, mine)
        for per_host in _gather(calls, timeout_s, "masked_input").values():
            for cid, y in per_host.items():
                server.add_masked_input(cid, y)
        survivors = server.close_masked_inputs()
        calls = {}
        for h, cids in by_host.items():
            mine = [c for c in cids if c in survivors]
            if mine:
                calls[h] = h.secagg_unmask.remote(params, survivors, mine)
        responses = merge(_gather(calls, timeout_s, "unmask"))
        return server.unmask(responses)
    finally:
        for h in by_host:  # best effort: free client states on hosts still alive (no-op after unmask)
            h.secagg_forget.remote(session, round_id)  # fire and forget; a dead host just errors the ref
