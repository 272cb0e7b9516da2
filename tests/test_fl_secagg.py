"""FL with ``fl.secure_aggregation: true``: fixed-point codec, config rules, and real MNIST runs on Ray actors.

The Ray tests watch the server side from the driver: every client task result, every masked vector the
SecAgg server receives, and every secure sum. A test client class additionally records, inside its actor,
the plaintext encodings it masked, so the tests can check that the server never received one and that the
secure sum is exactly the sum of the included clients' plaintexts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gptfl_ray.config import ConfigError, FLConfig, validate_config
from gptfl_ray.fl import secure
from gptfl_ray.fl.client import FLClient
from gptfl_ray.fl.pool import ClientPool
from gptfl_ray.fl.runner import check_fl_config, prepare_federated_data, run_federated
from gptfl_ray.fl.secure import SecureFLClient, UpdateCodec, secure_client_class
from gptfl_ray.io import load_weights, read_jsonl, save_weights
from gptfl_ray.labels.ring import Ring
from gptfl_ray.labels.secagg import SecAggServer, secure_sum_local
from gptfl_ray.models import build_model
from tests.cli_output import error_lines

LOCAL = {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}}


# ------------------------------------------------------------------------------------------ codec
def make_codec(k: int, size: int = 1000, trainable: int = 900, max_weight: int = 500, **fl) -> UpdateCodec:
    return UpdateCodec.for_round(
        FLConfig(**fl),
        num_trainable=trainable,
        size=size,
        participants=k,
        max_weight=max_weight,
        max_samples=max_weight,
    )


@pytest.mark.parametrize("bits", [32, 64])
def test_codec_sum_decodes_weighted_mean_within_stated_bound(bits):
    rng = np.random.default_rng(0)
    k, size, trainable = 12, 1000, 900
    codec = make_codec(k, size, trainable, secagg_ring_bits=bits, secagg_clip=0.5, secagg_buffer_clip=50.0)
    updates = [
        np.concatenate([rng.normal(0, 0.05, trainable), rng.normal(0, 5.0, size - trainable)]).astype(
            np.float32
        )
        for _ in range(k)
    ]
    n = rng.integers(1, 500, size=k)
    losses = rng.uniform(0.1, 3.0, size=k)
    enc = [
        codec.encode(u, float(w), int(w), float(loss)) for u, w, loss in zip(updates, n, losses, strict=True)
    ]
    assert all(
        e.dtype == (np.uint32 if bits == 32 else np.uint64) and e.shape == (codec.vector_len,) for e in enc
    )
    t = codec.decode(codec.ring.sum(enc), included=k)

    exact = np.sum([w * u.astype(np.float64) for u, w in zip(updates, n, strict=True)], axis=0) / n.sum()
    err = float(np.abs(t.mean - exact).max())
    assert err <= t.max_quant_error  # the bound the round record reports holds
    assert t.max_quant_error < (1e-6 if bits == 32 else 1e-14)
    assert t.weight == n.sum() and t.samples == n.sum()
    assert t.train_loss == pytest.approx(float(np.dot(n, losses) / n.sum()), rel=1e-5)
    assert t.clipped_fraction == 0 and t.norm_clipped == 0


def test_codec_worst_case_round_cannot_wrap():
    """Every participant at the largest weight with every coordinate at ± its clip: the sum still decodes."""
    k, w = 100, 60_000
    codec = make_codec(k, size=50, trainable=40, max_weight=w, secagg_clip=2.0, secagg_buffer_clip=30.0)
    for sign in (1.0, -1.0):
        u = sign * np.concatenate([np.full(40, 2.0), np.full(10, 30.0)])
        enc = codec.encode(u, w, w, 1e9)  # loss beyond the cap: capped, not wrapped
        t = codec.decode(codec.ring.sum([enc] * k), included=k)
        np.testing.assert_allclose(t.mean, u, atol=t.max_quant_error)
        assert t.weight == k * w and t.train_loss == pytest.approx(secure.LOSS_CAP)


def test_codec_clips_coordinates_and_norm_and_refuses_nan():
    codec = make_codec(2, size=10, trainable=8, secagg_clip=1.0, secagg_buffer_clip=100.0)
    u = np.zeros(10, dtype=np.float32)
    u[0], u[9] = 5.0, 50.0  # a parameter beyond its clip; a buffer within its own
    t = codec.decode(codec.ring.sum([codec.encode(u, 1.0, 1, 0.5), codec.encode(-u, 1.0, 1, 0.5)]), 2)
    assert t.clipped_fraction == pytest.approx(0.1)  # one of 10 coordinates, in each client
    np.testing.assert_allclose(t.mean, 0.0, atol=1e-9)
    one = codec.decode(codec.encode(u, 1.0, 1, 0.5).astype(np.uint64), 1)
    assert one.mean[0] == pytest.approx(1.0) and one.mean[9] == pytest.approx(50.0)

    normed = make_codec(2, size=10, trainable=8, max_update_norm=2.0)
    big = np.full(10, 3.0)  # norm 9.49: scaled down to 2 by the client, then within every clip
    t = normed.decode(normed.encode(big, 1.0, 1, 0.5).astype(np.uint64), 1)
    assert t.norm_clipped == 1 and np.linalg.norm(t.mean) == pytest.approx(2.0, rel=1e-6)
    for bad in (np.array([np.nan] + [0.0] * 9), np.array([np.inf] + [0.0] * 9)):
        with pytest.raises(ValueError, match="non-finite"):
            codec.encode(bad, 1.0, 1, 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode(u, 1.0, 1, float("nan"))
    with pytest.raises(ValueError, match="outside the round's bounds"):
        codec.encode(u, 501.0, 1, 0.5)  # above the public weight bound the scales assume: could wrap


def test_codec_vectors_through_secagg_with_a_dropout():
    """The packed encodings are valid SecAgg inputs; a client lost after key sharing is left out exactly."""
    rng = np.random.default_rng(1)
    codec = make_codec(5, size=300, trainable=300)
    vecs = {c: codec.encode(rng.normal(0, 0.1, 300), float(c + 1), c + 1, 1.0) for c in range(5)}
    res = secure_sum_local(vecs, threshold=3, ring=codec.ring, drop_at={2: "masked_input"})
    assert res.included == [0, 1, 3, 4] and res.dropped == [2]
    assert np.array_equal(res.total, codec.ring.sum([vecs[c] for c in res.included]))
    assert codec.decode(res.total, 4).weight == 1 + 2 + 4 + 5


# ------------------------------------------------------------------------------------------ config
SMALL = {
    "data": {"dataset": "mnist", "test_split": "holdout", "num_test": 500, "num_train": 2000},
    "partition": {"method": "dirichlet", "num_clients": 10, "alpha": 0.5},
    "model": {"name": "cnn"},
    "fl": {
        "strategy": {"name": "fedavg"},
        "rounds": 2,
        "clients_per_round": 5,
        "checkpoint_every": 0,
        "local": LOCAL,
        "num_actors": 2,
        "secure_aggregation": True,
    },
}


def small_cfg(**fl):
    raw = json.loads(json.dumps(SMALL))
    raw["fl"].update(fl)
    return validate_config(raw)


def test_config_rules():
    with pytest.raises(
        ConfigError, match=r"^fl\.secure_aggregation: not supported with fl\.strategy\.name='scaffold'"
    ):
        check_fl_config(small_cfg(strategy={"name": "scaffold"}))
    with pytest.raises(ConfigError, match=r"fl\.secure_aggregation: needs fl\.clients_per_round >= 2"):
        check_fl_config(small_cfg(clients_per_round=1))
    check_fl_config(small_cfg(strategy={"name": "scaffold"}, mode="isolated"))  # no aggregation there
    for name in ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        check_fl_config(small_cfg(strategy={"name": name}))
    with pytest.raises(ConfigError, match="secagg_ring_bits"):
        small_cfg(secagg_ring_bits=48)
    # a threshold at or below half of the participants needs an explicit opt-in (README: threat model)
    with pytest.raises(ConfigError, match=r"fl\.secagg_threshold: must be > 0\.5: .*secagg_allow_minority"):
        small_cfg(secagg_threshold=0.5)
    assert small_cfg(secagg_threshold=0.5, secagg_allow_minority_threshold=True).fl.secagg_threshold == 0.5
    assert secure_client_class(FLClient) is SecureFLClient
    with pytest.raises(TypeError, match="must subclass SecureFLClient"):
        secure_client_class(type("Custom", (FLClient,), {}))


def test_cli_rejects_scaffold_in_one_line(tmp_path, capsys):
    import yaml

    from gptfl_ray.cli import main

    raw = json.loads(json.dumps(SMALL))
    raw["fl"]["strategy"] = {"name": "scaffold"}
    path = tmp_path / "fl.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["federate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "fl.secure_aggregation" in err and "scaffold" in err and len(error_lines(err)) == 1


# ------------------------------------------------------------------------------------------ Ray runs
def recording_client(dump: Path, die_round: int | None = None):
    """SecureFLClient that records (test only) the plaintext it masks; optionally the actor holding
    participant 0 of ``die_round`` dies after key sharing, at the masked-input stage."""

    class RecordingClient(SecureFLClient):
        def secagg_vector(self, cid, round_id):
            v = super().secagg_vector(cid, round_id)
            if v is not None:
                np.save(dump / f"{round_id}-{cid}.npy", v)
            return v

        def secagg_masked_input(self, params, inboxes):
            if params.round_id == die_round and 0 in inboxes:
                os._exit(1)
            return super().secagg_masked_input(params, inboxes)

    return RecordingClient


class ServerSpy:
    """Everything the driver (server) receives: task results, masked vectors, secure sums."""

    def __init__(self, monkeypatch):
        self.results: list[dict] = []
        self.masked: dict[tuple[int, int], np.ndarray] = {}
        self.sums: dict[int, object] = {}
        spy = self
        run, add, secure_sum = ClientPool.run, SecAggServer.add_masked_input, secure.secure_sum

        def spy_run(pool, tasks, retries):
            for out in run(pool, tasks, retries):
                if out.task.method.startswith("train"):
                    spy.results.append(out.value)
                yield out

        def spy_add(server, cid, y):
            spy.masked[(server.params.round_id, cid)] = np.array(y, copy=True)
            return add(server, cid, y)

        def spy_sum(hosts, round_id, *args, **kwargs):
            result = secure_sum(hosts, round_id, *args, **kwargs)
            spy.sums[round_id] = result
            return result

        monkeypatch.setattr(ClientPool, "run", spy_run)
        monkeypatch.setattr(SecAggServer, "add_masked_input", spy_add)
        monkeypatch.setattr(secure, "secure_sum", spy_sum)

    def check_no_plaintext(self, dump: Path, ring: Ring) -> None:
        """No task result carries a vector; no masked vector resembles its plaintext; each secure sum is
        exactly the ring sum of its included clients' plaintexts."""
        assert self.results and all(set(r) == {"rejected", "seconds"} for r in self.results)
        for rnd, result in self.sums.items():
            plain = {p: np.load(dump / f"{rnd}-{p}.npy") for p in result.included}
            for p, x in plain.items():
                assert np.mean(self.masked[(rnd, p)] == x) < 1e-3, (rnd, p)
            assert np.array_equal(result.total, ring.sum(list(plain.values())))
            assert not np.array_equal(result.total, ring.sum([self.masked[(rnd, p)] for p in plain]))


@pytest.fixture(scope="module")
def small_data(data_dir):
    return prepare_federated_data(small_cfg(), seed=0)


def test_secure_fedavg_matches_plain_on_mnist(ray_session, data_dir, tmp_path, monkeypatch):
    """Acceptance: 20 Dirichlet(0.5) clients of 3,000 real MNIST images, 10 per round, 3 rounds, seed 0.

    Measured (seed 0): accuracy 0.383 / 0.394 / 0.586 on 1,000 held-out images in *both* arms (identical),
    train loss equal to 1e-7 relative, max |weight difference| after 3 rounds 3e-8 (float32 summation order
    vs exact ring sum + fixed point; 1e-4 in a 4,000-image variant, where local SGD amplified it more).
    Per-round fixed-point bound ~5e-9. Tolerances asserted: 0.01 accuracy, 1e-4 loss, 1e-3 weights.
    """
    raw = {
        "data": {"dataset": "mnist", "test_split": "holdout", "num_test": 1000, "num_train": 3000},
        "partition": {"method": "dirichlet", "num_clients": 20, "alpha": 0.5},
        "model": {"name": "cnn"},
        "fl": {"rounds": 3, "clients_per_round": 10, "checkpoint_every": 0, "local": LOCAL, "num_actors": 2},
    }
    plain_cfg = validate_config(raw)
    raw["fl"]["secure_aggregation"] = True
    secure_cfg = validate_config(raw)
    data = prepare_federated_data(plain_cfg, seed=0)
    plain = run_federated(plain_cfg, seed=0, out_dir=tmp_path / "plain", data=data)

    dump = tmp_path / "dump"
    dump.mkdir()
    spy = ServerSpy(monkeypatch)
    sec = run_federated(
        secure_cfg, seed=0, out_dir=tmp_path / "secure", data=data, client_cls=recording_client(dump)
    )
    spy.check_no_plaintext(dump, Ring.bits(32))
    assert sorted(spy.sums) == [1, 2, 3]

    p_recs, s_recs = (
        read_jsonl(tmp_path / "plain" / "metrics.jsonl"),
        read_jsonl(tmp_path / "secure" / "metrics.jsonl"),
    )
    assert plain["final_accuracy"] > max(0.5, p_recs[0]["accuracy"] + 0.1)  # it learned (chance: 0.1)
    for p, s in zip(p_recs, s_recs, strict=True):
        assert abs(p["accuracy"] - s["accuracy"]) <= 0.01
        assert s["train_loss"] == pytest.approx(p["train_loss"], rel=1e-4)
        assert s["num_updates"] == 10 and not s["skipped"] and s["grad_diversity"] is None
        info = s["secagg"]
        assert info["included"] == info["participants"] == 10 and info["threshold"] == 6
        assert info["max_quant_error"] < 1e-7 and info["clipped_fraction"] == 0
        # uplink = everything clients sent in the protocol; the masked vectors are uint32 ring elements
        assert info["bytes_in"]["masked_input"] == 10 * 4 * info["vector_len"]
        assert s["bytes_up"] == sum(info["bytes_in"].values()) > p["bytes_up"]
        assert s["bytes_down"] == p["bytes_down"] + sum(info["bytes_out"].values())
    wp, ws = (
        load_weights(tmp_path / "plain" / "final.safetensors"),
        load_weights(tmp_path / "secure" / "final.safetensors"),
    )
    assert max(float((wp[k] - ws[k]).abs().max()) for k in wp) < 1e-3
    assert sec["final_accuracy"] == pytest.approx(plain["final_accuracy"], abs=0.01)


def test_actor_death_after_key_sharing_is_recovered(ray_session, small_data, tmp_path, monkeypatch):
    """The actor hosting participant 0 dies at the masked-input stage of round 1: the survivors' sum is
    applied (threshold 20 %, opted in below a majority: at least 2 of 10 must survive), the dead actor is replaced,
    round 2 runs with every client."""
    dump = tmp_path / "dump"
    dump.mkdir()
    spy = ServerSpy(monkeypatch)
    cfg = small_cfg(
        clients_per_round=10,
        secagg_threshold=0.2,
        secagg_allow_minority_threshold=True,
        min_clients_fraction=0.2,
    )
    run_federated(
        cfg, seed=0, out_dir=tmp_path / "run", data=small_data, client_cls=recording_client(dump, 1)
    )
    r1, r2 = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    lost = spy.sums[1].dropped
    assert 0 in lost and 1 <= len(lost) <= 8, lost  # the victim hosted participant 0 (and some others)
    assert not r1["skipped"] and r1["num_updates"] == 10 - len(lost)
    assert r1["secagg"]["dropped_clients"] == [r1["sampled"][p] for p in lost]
    assert r1["secagg"]["bytes_in"]["masked_input"] == (10 - len(lost)) * 4 * r1["secagg"]["vector_len"]
    assert not r2["skipped"] and r2["num_updates"] == 10 and r2["failed_clients"] == []
    spy.check_no_plaintext(dump, Ring.bits(32))  # round 1's sum: exactly the survivors' plaintexts
    events = read_jsonl(tmp_path / "run" / "events.jsonl")
    assert [e["event"] for e in events] == ["secagg_dropout", "actor_died"]
    assert events[0]["clients"] == r1["secagg"]["dropped_clients"]


def test_dropout_below_threshold_skips_round(ray_session, small_data, tmp_path):
    """Threshold 100 %: losing one actor after key sharing aborts SecAgg; the round is skipped, no sum."""
    init = tmp_path / "init.safetensors"
    torch.manual_seed(1)
    save_weights(init, build_model("cnn", 10, (1, 28, 28)).state_dict())
    dump = tmp_path / "dump"
    dump.mkdir()
    cfg = small_cfg(rounds=1, clients_per_round=10, secagg_threshold=1.0)
    s = run_federated(
        cfg,
        seed=0,
        out_dir=tmp_path / "run",
        data=small_data,
        init_weights=init,
        client_cls=recording_client(dump, 1),
    )
    rec = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert rec["skipped"] and rec["num_updates"] == 0 and s["skipped_rounds"] == [1]
    assert rec["secagg"]["included"] == 0 and rec["secagg"]["threshold"] == 10
    skipped = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["event"] == "round_skipped"]
    assert len(skipped) == 1 and "secure aggregation aborted" in skipped[0]["reason"]
    w0, w1 = load_weights(init), load_weights(tmp_path / "run" / "final.safetensors")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_client_side_norm_clipping_and_nan_withholding(ray_session, small_data, tmp_path):
    """max_update_norm: clients clip (the server cannot see norms); a NaN client withholds its update."""
    data = prepare_federated_data(small_cfg(), seed=0)
    data.clients[3] = (torch.full_like(data.clients[3][0], float("nan")), data.clients[3][1])
    init = tmp_path / "init.safetensors"
    torch.manual_seed(1)
    save_weights(init, build_model("cnn", 10, (1, 28, 28)).state_dict())
    cfg = small_cfg(rounds=1, clients_per_round=10, max_update_norm=0.5, num_actors=1)
    run_federated(cfg, seed=0, out_dir=tmp_path / "run", data=data, init_weights=init)
    rec = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert rec["rejected"] == [3] and rec["num_updates"] == 9 and not rec["skipped"]
    assert rec["secagg"]["participants"] == 9 and rec["secagg"]["norm_clipped"] == 9
    w0, w1 = load_weights(init), load_weights(tmp_path / "run" / "final.safetensors")
    step = torch.cat([(w1[k] - w0[k]).reshape(-1) for k in w0])
    assert 0.1 < float(step.norm()) <= 0.5 + 1e-4  # a mean of vectors of norm 0.5
    events = read_jsonl(tmp_path / "run" / "events.jsonl")
    assert [e["event"] for e in events] == ["update_rejected"] and "non-finite" in events[0]["reason"]


class Interrupt(Exception):
    pass


def test_secure_resume_equals_uninterrupted(ray_session, small_data, tmp_path):
    """FedAdam (server optimizer state in the checkpoint) with SecAgg: the masks cancel exactly in the ring,
    so an interrupted and resumed run reproduces the uninterrupted weights bit for bit."""
    cfg = small_cfg(strategy={"name": "fedadam", "server_lr": 0.01}, rounds=4, checkpoint_every=2)
    run_federated(cfg, seed=0, out_dir=tmp_path / "ref", data=small_data)

    def stop_after_round_3(rec):
        if rec["round"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_federated(cfg, seed=0, out_dir=tmp_path / "run", data=small_data, on_round=stop_after_round_3)
    run_federated(cfg, seed=0, out_dir=tmp_path / "run", data=small_data, resume=True)
    a, b = (
        load_weights(tmp_path / "ref" / "final.safetensors"),
        load_weights(tmp_path / "run" / "final.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = read_jsonl(tmp_path / "ref" / "metrics.jsonl"), read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["accuracy"] for r in ra] == [r["accuracy"] for r in rb] and len(rb) == 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [
        {"name": "fedavg", "weighted": False},
        {"name": "fedprox", "mu": 0.01},
        {"name": "fedavgm", "momentum": 0.9},
        {"name": "fedadam", "server_lr": 0.01},
        {"name": "fedyogi", "server_lr": 0.01},
        {"name": "fedadagrad", "server_lr": 0.01},
    ],
    ids=lambda s: s["name"] + ("-unweighted" if s.get("weighted") is False else ""),
)
def test_strategy_server_update_on_secure_mean(ray_session, small_data, tmp_path, strategy):
    """One round from the same init and seeds: the clients' updates are identical in both arms, so the
    weights differ only by how the mean was formed (float32 sum vs exact ring sum + fixed point).

    Measured (seed 0): max |difference| 7e-9 to 3e-8 for all six, while the round moved the weights by
    1e-3 (FedAdagrad) to 7e-2 (FedAvg); asserted: below 1e-6."""
    plain = small_cfg(strategy=strategy, rounds=1, secure_aggregation=False, num_actors=1)
    sec = small_cfg(strategy=strategy, rounds=1, num_actors=1)
    run_federated(plain, seed=0, out_dir=tmp_path / "plain", data=small_data)
    run_federated(sec, seed=0, out_dir=tmp_path / "secure", data=small_data)
    a, b = (
        load_weights(tmp_path / "plain" / "final.safetensors"),
        load_weights(tmp_path / "secure" / "final.safetensors"),
    )
    torch.manual_seed(0)  # the runs' initial model
    init = build_model("cnn", 10, (1, 28, 28))
    moved = max(float((a[k] - init.state_dict()[k]).abs().max()) for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-6 < moved, (diff, moved)
