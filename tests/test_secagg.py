import contextlib
import os
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gptfl_ray.labels import shamir
from gptfl_ray.labels.iblt import IBLT
from gptfl_ray.labels.ring import (
    Ring,
    decode_weighted,
    dequantize,
    encode_weighted,
    fixed_point_scale,
    quantize,
)
from gptfl_ray.labels.secagg import (
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    UnmaskShares,
    _hkdf,
    _pair_sign,
    _share_point,
    secure_sum_local,
    threshold_count,
)
from gptfl_ray.labels.secagg_ray import SecAggHost, secure_sum

RINGS = [Ring.bits(64), Ring.bits(32), Ring.bits(12), Ring(2**61 - 1), Ring(1_000_003)]


def random_vectors(ring, n, length, seed=0):
    rng = np.random.default_rng(seed)
    hi = min(ring.modulus, 2**63)
    return {cid: rng.integers(0, hi, length, dtype=np.uint64) for cid in range(n)}


def plain_sum(ring, vectors, cids):
    total = 0
    for c in cids:
        total = total + vectors[c].astype(object)
    return np.asarray(total % ring.modulus, dtype=np.uint64)


# ----------------------------------------------------------------------------------------- shamir
@settings(max_examples=30, deadline=None, derandomize=True)
@given(secret=st.binary(max_size=64), n=st.integers(1, 12), data=st.data())
def test_shamir_any_threshold_subset_recovers(secret, n, data):
    t = data.draw(st.integers(1, n))
    points = list(range(1, n + 1))
    shares = shamir.split(secret, points, t)
    subset = data.draw(st.lists(st.sampled_from(points), min_size=t, max_size=n, unique=True))
    assert shamir.combine({x: shares[x] for x in subset}, t) == secret


def test_shamir_too_few_and_tampered_shares():
    secret = os.urandom(32)
    shares = shamir.split(secret, [1, 2, 3, 4, 5, 6], threshold=4)
    with pytest.raises(shamir.ShamirError, match="fewer than the threshold 4"):
        shamir.combine({x: shares[x] for x in (1, 2, 3)}, 4)
    tampered = dict(shares)
    tampered[3] = (tampered[3] + 1) % shamir.PRIME
    # with more shares than the threshold, a tampered one is detected
    with pytest.raises(shamir.ShamirError, match="inconsistent"):
        shamir.combine(tampered, 4)
    # with exactly `threshold` shares nothing can be checked: the result is simply not the secret
    # (SecAgg adds its own check: a rebuilt mask key must match the advertised public key)
    exact = {x: tampered[x] for x in (1, 2, 3, 4)}
    with contextlib.suppress(shamir.ShamirError):  # or it does not even decode as a secret
        assert shamir.combine(exact, 4) != secret
    assert shamir.share_from_bytes(shamir.share_to_bytes(shares[1])) == shares[1]
    with pytest.raises(shamir.ShamirError):
        shamir.share_from_bytes(b"\xff" * shamir.SHARE_BYTES)


# ------------------------------------------------------------------------------------------- ring
@settings(max_examples=40, deadline=None, derandomize=True)
@given(ring=st.sampled_from(RINGS), data=st.data())
def test_ring_arithmetic_matches_python_ints(ring, data):
    elems = st.integers(0, ring.modulus - 1)
    a = data.draw(st.lists(elems, min_size=1, max_size=20))
    b = data.draw(st.lists(elems, min_size=len(a), max_size=len(a)))
    A, B = np.array(a, dtype=np.uint64), np.array(b, dtype=np.uint64)
    m = ring.modulus
    assert ring.add(A, B).tolist() == [(x + y) % m for x, y in zip(a, b, strict=True)]
    assert ring.sub(A, B).tolist() == [(x - y) % m for x, y in zip(a, b, strict=True)]
    assert ring.neg(A).tolist() == [(-x) % m for x in a]
    signed = ring.to_signed(A)
    assert ring.from_signed(signed).tolist() == a
    assert all(-m // 2 <= s < (m + 1) // 2 for s in signed.tolist())


@pytest.mark.parametrize("ring", RINGS, ids=lambda r: str(r.modulus))
def test_prg_masks_are_deterministic_in_range_and_uniform(ring):
    seed = os.urandom(32)
    a, b = ring.random(seed, 50_000), ring.random(seed, 50_000)
    assert np.array_equal(a, b) and int(a.max()) < ring.modulus
    assert not np.array_equal(a, ring.random(os.urandom(32), 50_000))
    counts = np.bincount((a.astype(object) * 16 // ring.modulus).astype(np.int64), minlength=16)
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 37.7  # chi-square, 15 dof, p = 0.001


def test_quantize_roundtrip_clip_and_overflow():
    ring = Ring.bits(32)
    x = np.random.default_rng(0).normal(size=1000)
    q = quantize(x, ring, scale=2.0**16, clip=2.0)
    back = dequantize(q, ring, 2.0**16)
    assert np.max(np.abs(back - np.clip(x, -2, 2))) <= 0.5 / 2**16
    with pytest.raises(ValueError, match="beyond the ring"):
        quantize(np.array([1e6]), ring, scale=2.0**16)
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([np.nan]), ring, scale=1.0)
    stochastic = dequantize(
        quantize(np.full(20_000, 0.3), ring, 1.0, rng=np.random.default_rng(1)), ring, 1.0
    )
    assert set(np.unique(stochastic)) == {0.0, 1.0} and abs(stochastic.mean() - 0.3) < 0.02


def test_fixed_point_scale_keeps_worst_case_sums_exact():
    for ring in (Ring.bits(32), Ring.bits(64), Ring(2**61 - 1)):
        clients, clip = 100, 3.0
        scale = fixed_point_scale(ring, clients * clip)
        worst = [quantize(np.array([clip, -clip]), ring, scale) for _ in range(clients)]
        assert dequantize(ring.sum(worst), ring, scale).tolist() == [clients * clip, -clients * clip]
        assert 2 * scale * clients * clip >= (ring.half - 1) * 0.99  # the largest such power of two


# ------------------------------------------------------------------------------- secagg protocol
@pytest.mark.parametrize("num_clients", [10, 50])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_exact_modular_sum_with_dropouts_after_key_sharing(num_clients, dropout):
    ring = Ring.bits(64)
    vectors = random_vectors(ring, num_clients, 2000, seed=num_clients)
    rng = np.random.default_rng(1)
    dropped = rng.choice(num_clients, int(dropout * num_clients), replace=False).tolist()
    result = secure_sum_local(
        vectors, threshold=int(0.6 * num_clients), ring=ring, drop_at=dict.fromkeys(dropped, "masked_input")
    )
    assert result.dropped == sorted(dropped)
    assert result.included == sorted(set(range(num_clients)) - set(dropped))
    assert np.array_equal(result.total, plain_sum(ring, vectors, result.included))


@pytest.mark.parametrize("ring", RINGS[1:], ids=lambda r: str(r.modulus))
def test_exact_sum_in_other_rings_and_every_dropout_stage(ring):
    vectors = random_vectors(ring, 12, 500)
    drop_at = {0: "share_keys", 3: "masked_input", 4: "masked_input", 7: "unmask", 11: "advertise_keys"}
    result = secure_sum_local(vectors, threshold=7, ring=ring, drop_at=drop_at)
    # clients 0 and 11 never shared keys, 3 and 4 dropped after sharing, 7 sent its input but not its shares
    assert result.included == [1, 2, 5, 6, 7, 8, 9, 10]
    assert np.array_equal(result.total, plain_sum(ring, vectors, result.included))


def test_dropouts_beyond_threshold_fail_clearly():
    vectors = random_vectors(Ring.bits(64), 10, 100)
    with pytest.raises(SecAggError, match="masked_input: 6 clients left, fewer than the threshold 7"):
        secure_sum_local(vectors, threshold=7, drop_at=dict.fromkeys(range(4), "masked_input"))
    # enough masked inputs, but too few clients left to unmask: still no (wrong) sum
    with pytest.raises(SecAggError, match="unmask: 6 clients left"):
        secure_sum_local(vectors, threshold=7, drop_at=dict.fromkeys(range(4), "unmask"))


def run_manual(vectors, threshold, ring, session="t", allow_minority=False):
    """Drive the state machines by hand; returns (clients, server, inboxes, masked inputs the server saw)."""
    params = SecAggParams(session, 0, len(next(iter(vectors.values()))), threshold, ring, allow_minority)
    clients = {c: SecAggClient(c, params) for c in vectors}
    server = SecAggServer(params)
    roster = server.collect_keys({c: cl.advertise_keys() for c, cl in clients.items()})
    inboxes = server.route_shares({c: cl.share_keys(roster) for c, cl in clients.items()})
    return params, clients, server, inboxes


def test_server_sees_only_uniform_looking_vectors():
    ring = Ring.bits(32)
    # very structured plaintexts: constants and a ramp
    vectors = {c: np.full(20_000, c, dtype=np.uint64) for c in range(5)}
    vectors[5] = np.arange(20_000, dtype=np.uint64)
    _, clients, server, inboxes = run_manual(vectors, 4, ring)
    seen = {}
    for c, cl in clients.items():
        seen[c] = cl.masked_input(inboxes[c], vectors[c])
        server.add_masked_input(c, seen[c])
    for y in seen.values():
        assert y.dtype == np.uint32  # 32-bit ring packs on the wire
        for x in vectors.values():  # differs from every client's plaintext, not just its own
            assert np.mean(y == x) < 1e-3
        counts = np.bincount(y.astype(np.int64) >> 28, minlength=16)
        chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
        assert chi2 < 37.7, chi2
        assert abs(np.corrcoef(y.astype(float), np.arange(20_000))[0, 1]) < 0.05
    survivors = server.close_masked_inputs()
    result = server.unmask({c: clients[c].unmask(survivors) for c in survivors})
    assert np.array_equal(result.total, plain_sum(ring, vectors, range(6)))


def test_clients_never_reveal_both_secrets_of_one_client():
    vectors = random_vectors(Ring.bits(64), 8, 50)
    _, clients, server, inboxes = run_manual(vectors, 5, Ring.bits(64))
    for c in range(6):  # 6 and 7 drop after key sharing
        server.add_masked_input(c, clients[c].masked_input(inboxes[c], vectors[c]))
    for c in (6, 7):
        clients[c].masked_input(inboxes[c], vectors[c])  # computed but never delivered
    survivors = server.close_masked_inputs()
    responses = {c: clients[c].unmask(survivors) for c in survivors}
    for r in responses.values():
        assert set(r.mask_key_shares) == {6, 7} and set(r.seed_shares) == set(range(6))
        assert not set(r.mask_key_shares) & set(r.seed_shares)
    assert np.array_equal(server.unmask(responses).total, plain_sum(Ring.bits(64), vectors, range(6)))


def test_threshold_count_is_a_majority_of_at_least_two():
    assert [threshold_count(0.6, n) for n in (1, 2, 3, 10, 11)] == [2, 2, 2, 6, 7]
    assert threshold_count(0.7, 10) == 7  # 0.7 · 10 = 7.000000000000001 in floating point
    # the rounding can never leave t <= |U|/2 ...
    assert all(2 * threshold_count(f, n) > n for f in (0.01, 0.5, 0.5000001, 0.6) for n in range(1, 40))
    # ... unless the caller opts out (still at least 2)
    assert threshold_count(0.5, 10, allow_minority=True) == 5
    assert threshold_count(0.01, 10, allow_minority=True) == 2


def test_minority_threshold_is_refused_by_server_and_clients():
    vectors = random_vectors(Ring.bits(64), 6, 10)
    params = SecAggParams("t", 0, 10, 3)  # 2·3 <= 6
    clients = {c: SecAggClient(c, params) for c in vectors}
    keys = {c: cl.advertise_keys() for c, cl in clients.items()}
    with pytest.raises(SecAggError, match="threshold 3 is not more than half of the 6 clients"):
        SecAggServer(params).collect_keys(keys)
    with pytest.raises(SecAggError, match="client 0: threshold 3 is not more than half"):
        clients[0].share_keys(keys)  # a client checks the roster it is sent, whatever the server did
    result = secure_sum_local(vectors, threshold=3, allow_minority=True, drop_at={5: "masked_input"})
    assert np.array_equal(result.total, plain_sum(Ring.bits(64), vectors, range(5)))


def _unmask_client0(ring, vectors, params, roster, y0, seed_from, key_from):
    """What a server can rebuild of client 0's input from reveals it got by lying about U3 (see below)."""
    b0 = shamir.combine({_share_point(c): r.seed_shares[0] for c, r in seed_from.items()}, params.threshold)
    s0 = shamir.combine(
        {_share_point(c): r.mask_key_shares[0] for c, r in key_from.items()}, params.threshold
    )
    sk = X25519PrivateKey.from_private_bytes(s0)
    x = ring.sub(ring.check(y0), ring.random(b0, 10))
    for v in sorted(set(vectors) - {0}):
        shared = sk.exchange(X25519PublicKey.from_public_bytes(roster[v].mask_key))
        mask = ring.random(_hkdf(shared, b"mask", params.context), 10)
        x = (ring.sub if _pair_sign(0, v) > 0 else ring.add)(x, mask)
    return x


def test_different_survivor_lists_unmask_a_client_only_below_a_majority():
    """The attack the majority rule stops: the server tells clients 1-3 "0 survived" (they reveal b_0 shares)
    and clients 4-6 "0 dropped" (they reveal s_0 shares). With t = 3 of 7 it rebuilds both secrets and
    unmasks client 0's input; client 0 itself refuses the list that leaves it out."""
    ring = Ring.bits(64)
    vectors = random_vectors(ring, 7, 10)
    for threshold, allow in ((3, True), (4, False)):
        params, clients, server, inboxes = run_manual(vectors, threshold, ring, allow_minority=allow)
        roster = server.roster
        masked = {c: clients[c].masked_input(inboxes[c], vectors[c]) for c in clients}
        with pytest.raises(SecAggError, match="client 0: the survivor list leaves out this client"):
            clients[0].unmask([1, 2, 3, 4, 5, 6])
        seed_from = {c: clients[c].unmask(list(range(7))) for c in (1, 2, 3)}
        key_from = {c: clients[c].unmask([1, 2, 3, 4, 5, 6]) for c in (4, 5, 6)}
        for c in (1, 4):  # each client answers once: no peer gets both its shares from one client
            with pytest.raises(SecAggError, match="out of order"):
                clients[c].unmask(list(range(7)))
        if allow:
            x0 = _unmask_client0(ring, vectors, params, roster, masked[0], seed_from, key_from)
            assert np.array_equal(x0, vectors[0])  # why minority thresholds need an explicit opt-in
        else:
            with pytest.raises(shamir.ShamirError, match="fewer than the threshold 4"):
                _unmask_client0(ring, vectors, params, roster, masked[0], seed_from, key_from)


def test_tampered_or_misrouted_share_ciphertext_is_rejected():
    vectors = random_vectors(Ring.bits(64), 5, 10)
    _, clients, _, inboxes = run_manual(vectors, 3, Ring.bits(64))
    bad = dict(inboxes[0])
    blob = bytearray(bad[1])
    blob[-1] ^= 1
    bad[1] = bytes(blob)
    with pytest.raises(SecAggError, match="client 0: the share from client 1 failed authentication"):
        clients[0].masked_input(bad, vectors[0])
    swapped = dict(inboxes[2])
    swapped[1], swapped[3] = swapped[3], swapped[1]  # a server re-routing ciphertexts between senders
    with pytest.raises(SecAggError, match="failed authentication"):
        clients[2].masked_input(swapped, vectors[2])


def test_tampered_unmask_share_is_detected():
    ring = Ring.bits(64)
    vectors = random_vectors(ring, 6, 10)
    _, clients, server, inboxes = run_manual(vectors, 4, ring)
    for c in range(5):  # client 5 drops after key sharing
        server.add_masked_input(c, clients[c].masked_input(inboxes[c], vectors[c]))
    survivors = server.close_masked_inputs()
    responses = {c: clients[c].unmask(survivors) for c in survivors}
    r = responses[2]
    responses[2] = UnmaskShares(2, {5: (r.mask_key_shares[5] + 1) % shamir.PRIME}, r.seed_shares)
    with pytest.raises(SecAggError, match="cannot rebuild the key of client 5: .*inconsistent"):
        server.unmask(responses)


def test_protocol_order_and_input_checks():
    params = SecAggParams("t", 0, 4, 1)
    client = SecAggClient(0, params)
    with pytest.raises(SecAggError, match="out of order"):
        client.unmask([0])
    roster = {0: client.advertise_keys()}
    client.share_keys(roster)
    with pytest.raises(SecAggError, match="shape"):
        client.masked_input({}, np.zeros(5, dtype=np.uint64))
    with pytest.raises(ValueError, match="uint64 or uint32"):
        params.ring.check(np.zeros(4, dtype=np.float32))


def test_weighted_mean_of_float_updates_through_secagg():
    """The FL path: clients send quantize([n·Δ, n]); the server decodes the weighted mean."""
    rng = np.random.default_rng(0)
    ring = Ring.bits(64)
    updates = {c: rng.normal(scale=0.05, size=3000) for c in range(10)}
    weights = {c: int(rng.integers(10, 600)) for c in range(10)}
    clip = 1.0
    scale = fixed_point_scale(ring, sum(weights.values()) * clip)
    vectors = {c: encode_weighted(updates[c], weights[c], ring, scale, clip) for c in updates}
    result = secure_sum_local(vectors, threshold=6, ring=ring, drop_at={4: "masked_input"})
    mean, total_weight = decode_weighted(result.total, ring, scale)
    kept = [c for c in updates if c != 4]
    expected = np.average([updates[c] for c in kept], axis=0, weights=[weights[c] for c in kept])
    assert total_weight == sum(weights[c] for c in kept)
    assert np.max(np.abs(mean - expected)) < 1e-9


def test_iblt_tables_sum_exactly_in_the_prime_field():
    t = IBLT(capacity=40, seed=5)
    rng = np.random.default_rng(2)
    names = [f"label {i}" for i in range(40)]
    held = {c: rng.choice(names, int(rng.integers(1, 10)), replace=False).tolist() for c in range(12)}
    vectors = {c: t.encode(v) for c, v in held.items()}
    result = secure_sum_local(
        vectors, threshold=8, ring=t.ring, drop_at={0: "masked_input", 1: "masked_input"}
    )
    truth: dict[str, int] = {}
    for c in result.included:
        for name in held[c]:
            truth[name] = truth.get(name, 0) + 1
    assert t.decode(result.total) == truth


# ------------------------------------------------------------------------------------------- ray
class VectorHost(SecAggHost):
    """Test host: fixed vectors; can refuse some clients or die in a given stage."""

    def __init__(self, vectors, refuse=(), die_in=None):
        self.vectors, self.refuse, self.die_in = vectors, set(refuse), die_in

    def secagg_vector(self, cid, round_id):
        return None if cid in self.refuse else self.vectors[cid]

    def secagg_masked_input(self, params, inboxes):
        if self.die_in == "masked_input":
            os._exit(1)  # the host process dies after key sharing
        if self.die_in == "stall":
            time.sleep(120)  # hangs past the driver's deadline
        return super().secagg_masked_input(params, inboxes)

    def secagg_unmask(self, params, survivors, cids):
        if self.die_in == "unmask":
            os._exit(1)
        return super().secagg_unmask(params, survivors, cids)


def start_hosts(ray, vectors, layout, **kwargs_by_host):
    actor = ray.remote(num_cpus=0)(VectorHost)
    hosts, owner = [], {}
    for i, cids in enumerate(layout):
        h = actor.remote({c: vectors[c] for c in cids}, **kwargs_by_host.get(str(i), {}))
        hosts.append(h)
        owner.update(dict.fromkeys(cids, h))
    ray.get([h.secagg_forget.remote("warm-up", 0) for h in hosts])  # started before any deadline runs
    return hosts, owner


def test_ray_secure_sum_with_hosts_dying_or_stalling_after_key_sharing(ray_session):
    ray = ray_session
    ring = Ring.bits(64)
    vectors = random_vectors(ring, 14, 5000)
    layout = [range(0, 5), range(5, 9), range(9, 12), range(12, 14)]
    behaviour = {"1": {"die_in": "masked_input"}, "2": {"refuse": [10]}, "3": {"die_in": "stall"}}
    hosts, owner = start_hosts(ray, vectors, layout, **behaviour)
    # 7 of 14 survive: below a majority, so this dropout test opts out of the majority rule
    result = secure_sum(
        owner,
        round_id=3,
        vector_len=5000,
        threshold=7,
        ring=ring,
        session="t",
        timeout_s=15,
        allow_minority=True,
    )
    assert result.included == [0, 1, 2, 3, 4, 9, 11]
    assert result.dropped == [5, 6, 7, 8, 10, 12, 13]
    assert np.array_equal(result.total, plain_sum(ring, vectors, result.included))
    assert result.stats.bytes_in["masked_input"] == 7 * 5000 * 8
    for h in hosts:
        ray.kill(h)


def test_ray_secure_sum_too_few_survivors_fails(ray_session):
    ray = ray_session
    ring = Ring.bits(32)
    vectors = random_vectors(ring, 6, 100)
    hosts, owner = start_hosts(ray, vectors, [range(0, 3), range(3, 6)], **{"0": {"die_in": "unmask"}})
    with pytest.raises(SecAggError, match="unmask: 3 clients left, fewer than the threshold 4"):
        secure_sum(owner, round_id=0, vector_len=100, threshold=4, ring=ring, timeout_s=60)
    for h in hosts:
        ray.kill(h)
