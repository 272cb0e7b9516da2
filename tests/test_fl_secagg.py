"""FL with ``fl.secure_aggregation: true``: fixed-point codec, config rules, real MNIST runs on Ray actors, and
each strategy's server update on the secure mean versus the plain one, in-process (no Ray).

Six Ray runs in all: a plain and a secure FedAdam run (module fixtures: the secure one is both the plain-vs-secure
equivalence arm and the uninterrupted reference of the resume test), the interrupted and resumed secure run, the
actor death SecAgg recovers from, and one run shared by the two other failure-path tests (round 1: SecAgg
aborted; round 2: NaN withheld, norms clipped). Starting client actors is most of a small run's cost: a run
that follows a finished one adopts its actors (``Runs``), so in file order the six runs start 6 actor processes
(2 of them replacements of the killed ones), not 14.

The Ray tests watch the server side from the driver: every client task result, every masked vector the
SecAgg server receives, every secure sum, and the global weights before and after each round. A test client
class additionally records, inside its actor, the plaintext encodings it masked, so the tests can check that
the server never received one and that the secure sum is exactly the sum of the included clients' plaintexts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gptfl_ray.config import ConfigError, FLConfig, validate_config
from gptfl_ray.fl import secure
from gptfl_ray.fl.client import ClientSpec, FLClient, task_seed
from gptfl_ray.fl.flat import VectorLayout
from gptfl_ray.fl.pool import ClientPool, IdleActors
from gptfl_ray.fl.runner import check_fl_config, prepare_federated_data, run_federated, server_context
from gptfl_ray.fl.secure import SecureFLClient, UpdateCodec, secure_client_class
from gptfl_ray.fl.server import FederatedServer, RoundSum, aggregation_for, sample_clients
from gptfl_ray.io import load_weights, read_jsonl, save_weights
from gptfl_ray.labels.ring import Ring
from gptfl_ray.labels.secagg import SecAggServer, secure_sum_local
from gptfl_ray.models import build_model
from gptfl_ray.training import one_torch_thread
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
def recording_client(dump: Path, die: Path):
    """SecureFLClient that records (test only) the plaintext it masks into ``dump``; while the file ``die`` holds
    a round number, the actor holding participant 0 of that round dies after key sharing, at the masked-input
    stage (read at that moment: the same actors serve runs with and without a death)."""

    class RecordingClient(SecureFLClient):
        def secagg_vector(self, cid, round_id):
            v = super().secagg_vector(cid, round_id)
            if v is not None:
                np.save(dump / f"{round_id}-{cid}.npy", v)
            return v

        def secagg_masked_input(self, params, inboxes):
            if die.is_file() and params.round_id == int(die.read_text()) and 0 in inboxes:
                os._exit(1)
            return super().secagg_masked_input(params, inboxes)

    return RecordingClient


class ServerSpy:
    """Everything the driver (server) receives: task results, masked vectors, secure sums; and the global weights
    before and after each round (``weights[round]``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.results: list[dict] = []
        self.masked: dict[tuple[int, int], np.ndarray] = {}
        self.sums: dict[int, object] = {}
        self.weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        spy = self
        run, add, secure_sum = ClientPool.run, SecAggServer.add_masked_input, secure.secure_sum
        finish_round = FederatedServer.finish_round

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

        def spy_finish(server, tasks):
            x, rec = finish_round(server, tasks)
            spy.weights[tasks.rnd] = (tasks.x.clone(), x.clone())
            return x, rec

        monkeypatch.setattr(ClientPool, "run", spy_run)
        monkeypatch.setattr(SecAggServer, "add_masked_input", spy_add)
        monkeypatch.setattr(secure, "secure_sum", spy_sum)
        monkeypatch.setattr(FederatedServer, "finish_round", spy_finish)

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


@dataclass
class Run:
    """A ``run_federated`` call: its folder and summary, the spy that watched it and the plaintext encodings its
    clients recorded (``dump``)."""

    out: Path
    summary: dict | None
    spy: ServerSpy
    dump: Path

    @property
    def metrics(self) -> list[dict]:
        return read_jsonl(self.out / "metrics.jsonl")

    @property
    def events(self) -> list[dict]:
        return read_jsonl(self.out / "events.jsonl")

    @property
    def final(self) -> dict[str, torch.Tensor]:
        return load_weights(self.out / "final.safetensors")


class Runs:
    """Every Ray run of this module: watched by a :class:`ServerSpy`, on client actors of one class that record
    their plaintexts (``recording_client``), taken over from the previous run when it finished (``IdleActors``:
    adopted and rebuilt for the new run, as the arms of a seed in ``gptfl run`` are) instead of a new pool of
    processes each time."""

    def __init__(self, root: Path, idle: IdleActors):
        self.root, self.idle = root, idle
        self.inbox, self.die = root / "inbox", root / "die-round"
        self.inbox.mkdir()
        self.client_cls = recording_client(self.inbox, self.die)
        self.done = 0

    def run(self, cfg, data, out: Path, *, die_round: int | None = None, **kwargs) -> Run:
        """``run_federated(cfg, seed=0, out_dir=out, data=data, **kwargs)``, the actor hosting participant 0 of
        ``die_round`` dying after key sharing; the plaintexts its clients recorded are moved to a folder of their
        own (``Run.dump``), also when the run raises."""
        self.done += 1
        dump = self.root / f"dump-{self.done}"
        if die_round is not None:
            self.die.write_text(str(die_round))
        summary = None
        try:
            with pytest.MonkeyPatch.context() as mp:
                spy = ServerSpy(mp)
                summary = run_federated(
                    cfg, seed=0, out_dir=out, data=data, client_cls=self.client_cls, idle=self.idle, **kwargs
                )
        finally:
            self.die.unlink(missing_ok=True)
            self.inbox.rename(dump)  # runs are sequential: everything there is this run's
            self.inbox.mkdir()
        return Run(out, summary, spy, dump)


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """The module's :class:`Runs`; leaving the module stops the idle actors (they hold the session's CPUs:
    every Ray run here goes through this)."""
    with IdleActors() as idle:
        yield Runs(tmp_path_factory.mktemp("clients"), idle)


# FedAdam: server optimizer state, which the resume test needs in the checkpoint; 4 rounds so that the interrupted
# run (stopped after round 3, checkpoint at round 2) has a round to redo and one still to run.
FEDADAM = {"strategy": {"name": "fedadam", "server_lr": 0.01}, "rounds": 4, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def small_data(data_dir):
    return prepare_federated_data(small_cfg(), seed=0)


@pytest.fixture(scope="module")
def plain_fedadam(runs, small_data, tmp_path_factory) -> Run:
    """The plain arm of the equivalence test: ``small_cfg(**FEDADAM)`` without secure aggregation, seed 0 (the
    recording client class only adds to the secure protocol, which a plain run never calls)."""
    cfg = small_cfg(**FEDADAM, secure_aggregation=False)
    return runs.run(cfg, small_data, tmp_path_factory.mktemp("plain") / "run")


@pytest.fixture(scope="module")
def secure_fedadam(runs, small_data, tmp_path_factory) -> Run:
    """``small_cfg(**FEDADAM)`` (secure), seed 0, uninterrupted: the secure arm of the equivalence test and the
    reference of the resume test. Read-only."""
    return runs.run(small_cfg(**FEDADAM), small_data, tmp_path_factory.mktemp("secure") / "run")


def test_secure_fedadam_matches_plain_on_mnist(plain_fedadam, secure_fedadam):
    """Acceptance, the one Ray end-to-end equivalence run: plain and secure FedAdam from the same seed learn the
    same model (accuracy, loss, weights), the server never holds a plaintext (masked vectors only; each secure
    sum is exactly the included plaintexts' ring sum), and the protocol traffic is counted in the bytes.
    10 Dirichlet(0.5) clients of 2,000 real MNIST images, 5 per round, 4 rounds, seed 0: the resume test's
    config, whose uninterrupted run is this secure arm. Each strategy's server update on the secure mean (FedAvg's
    among them) is compared with the plain one in-process below.

    Measured (seed 0): accuracy 0.150 / 0.374 / 0.520 / 0.630 on 500 held-out images in *both* arms
    (identical), train loss equal to 8e-8 relative, max |weight difference| after 4 rounds 6e-8 while the run
    moved the weights by up to 4e-2. Per-round fixed-point bound ~3e-9.
    Tolerances asserted: 0.01 accuracy, 1e-4 loss, 1e-3 weights.
    """
    plain, sec = plain_fedadam, secure_fedadam
    spy = sec.spy
    spy.check_no_plaintext(sec.dump, Ring.bits(32))
    assert sorted(spy.sums) == [1, 2, 3, 4]

    p_recs, s_recs = plain.metrics, sec.metrics
    assert plain.summary["final_accuracy"] > max(0.5, p_recs[0]["accuracy"] + 0.1)  # it learned (chance: 0.1)
    for p, s in zip(p_recs, s_recs, strict=True):
        assert abs(p["accuracy"] - s["accuracy"]) <= 0.01
        assert s["train_loss"] == pytest.approx(p["train_loss"], rel=1e-4)
        assert s["num_updates"] == 5 and not s["skipped"] and s["grad_diversity"] is None
        info = s["secagg"]
        assert info["included"] == info["participants"] == 5 and info["threshold"] == 3
        assert info["max_quant_error"] < 1e-7 and info["clipped_fraction"] == 0
        # uplink = everything clients sent in the protocol; the masked vectors are uint32 ring elements
        assert info["bytes_in"]["masked_input"] == 5 * 4 * info["vector_len"]
        assert s["bytes_up"] == sum(info["bytes_in"].values()) > p["bytes_up"]
        assert s["bytes_down"] == p["bytes_down"] + sum(info["bytes_out"].values())
    wp, ws = plain.final, sec.final
    assert max(float((wp[k] - ws[k]).abs().max()) for k in wp) < 1e-3
    assert sec.summary["final_accuracy"] == pytest.approx(plain.summary["final_accuracy"], abs=0.01)


class Interrupt(Exception):
    pass


def test_secure_resume_equals_uninterrupted(runs, secure_fedadam, small_data, tmp_path):
    """FedAdam (server optimizer state in the checkpoint) with SecAgg: the masks cancel exactly in the ring,
    so an interrupted and resumed run reproduces the uninterrupted weights (``secure_fedadam``) bit for bit."""
    cfg = small_cfg(**FEDADAM)

    def stop_after_round_3(rec):
        if rec["round"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        runs.run(cfg, small_data, tmp_path / "run", on_round=stop_after_round_3)
    runs.run(cfg, small_data, tmp_path / "run", resume=True)
    a, b = secure_fedadam.final, load_weights(tmp_path / "run" / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = secure_fedadam.metrics, read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["accuracy"] for r in ra] == [r["accuracy"] for r in rb] and len(rb) == 4


def test_actor_death_after_key_sharing_is_recovered(runs, small_data, tmp_path):
    """The actor hosting participant 0 dies at the masked-input stage of round 1: the survivors' sum is
    applied (threshold 20 %, opted in below a majority: at least 2 of 10 must survive) and is exactly their
    plaintexts' ring sum, the dropout and the death are logged, the dead actor is replaced, and round 2 runs
    with every client (2 rounds: the fewest that show the replacement serving)."""
    cfg = small_cfg(
        clients_per_round=10,
        secagg_threshold=0.2,
        secagg_allow_minority_threshold=True,
        min_clients_fraction=0.2,
    )
    run = runs.run(cfg, small_data, tmp_path / "run", die_round=1)
    spy = run.spy
    r1, r2 = run.metrics
    lost = spy.sums[1].dropped
    assert 0 in lost and 1 <= len(lost) <= 8, lost  # the victim hosted participant 0 (and some others)
    assert not r1["skipped"] and r1["num_updates"] == 10 - len(lost)
    assert r1["secagg"]["dropped_clients"] == [r1["sampled"][p] for p in lost]
    assert r1["secagg"]["bytes_in"]["masked_input"] == (10 - len(lost)) * 4 * r1["secagg"]["vector_len"]
    assert not r2["skipped"] and r2["num_updates"] == 10 and r2["failed_clients"] == []
    spy.check_no_plaintext(run.dump, Ring.bits(32))  # round 1's sum: exactly the survivors' plaintexts
    events = run.events
    assert [e["event"] for e in events] == ["secagg_dropout", "actor_died"]
    assert events[0]["clients"] == r1["secagg"]["dropped_clients"]


@pytest.fixture(scope="module")
def abort_then_nan(runs, small_data, tmp_path_factory) -> tuple[Run, Path]:
    """One run shared by the two tests below: threshold 100 %, two actors, max_update_norm 0.5, all 10 clients
    each round, client 3's inputs NaN (in a copy of small_data; small_data stays clean), from saved initial
    weights. Round 1: the actor hosting participant 0 dies after key sharing; round 2 runs on its replacement
    and the survivor. Returns the run and the initial weights' file."""
    clients = list(small_data.clients)
    clients[3] = (torch.full_like(clients[3][0], float("nan")), clients[3][1])
    data = dataclasses.replace(small_data, clients=clients)
    root = tmp_path_factory.mktemp("abort")
    init = root / "init.safetensors"
    torch.manual_seed(1)
    save_weights(init, build_model("cnn", 10, (1, 28, 28)).state_dict())
    cfg = small_cfg(rounds=2, clients_per_round=10, secagg_threshold=1.0, max_update_norm=0.5)
    return runs.run(cfg, data, root / "run", init_weights=init, die_round=1), init


# the events of that run: round 1's withheld update, the death, the skip; round 2's withheld update
ABORT_THEN_NAN_EVENTS = ["update_rejected", "actor_died", "round_skipped", "update_rejected"]


def test_dropout_below_threshold_skips_round(abort_then_nan):
    """Threshold 100 %: losing one of two actors after key sharing (survivors left, but fewer than the
    threshold) aborts SecAgg; the round is skipped with its reason logged, no sum is applied (the weights stay
    the initial ones). Round 1 of ``abort_then_nan`` (9 participants: client 3 withholds its update)."""
    run, init = abort_then_nan
    rec = run.metrics[0]
    assert rec["skipped"] and rec["num_updates"] == 0 and run.summary["skipped_rounds"] == [1]
    assert rec["secagg"]["participants"] == 9 and rec["secagg"]["included"] == 0
    assert rec["secagg"]["threshold"] == 9
    events = run.events
    assert [e["event"] for e in events] == ABORT_THEN_NAN_EVENTS
    (skipped,) = [e for e in events if e["event"] == "round_skipped"]
    assert skipped["round"] == 1 and "secure aggregation aborted" in skipped["reason"]
    assert 1 not in run.spy.sums  # no sum was revealed
    before, after = run.spy.weights[1]
    w0 = load_weights(init)
    layout = VectorLayout.of(build_model("cnn", 10, (1, 28, 28)))
    assert torch.equal(before, layout.to_vector(w0)) and torch.equal(after, before)


def test_client_side_norm_clipping_and_nan_withholding(abort_then_nan):
    """max_update_norm: clients clip (the server cannot see norms), so the applied step is a mean of vectors of
    norm 0.5; a client with NaN data withholds its update (one ``update_rejected`` event a round, 9
    participants). Round 2 of ``abort_then_nan``, on the replacement actor and the one that survived."""
    run, _ = abort_then_nan
    r1, rec = run.metrics
    assert r1["rejected"] == [3]  # round 1 too (its client 3 trained before the death)
    assert rec["rejected"] == [3] and rec["num_updates"] == 9 and not rec["skipped"]
    assert rec["failed_clients"] == []
    assert rec["secagg"]["participants"] == 9 and rec["secagg"]["norm_clipped"] == 9
    before, after = run.spy.weights[2]
    step = after - before
    assert 0.1 < float(step.norm()) <= 0.5 + 1e-4  # a mean of vectors of norm 0.5
    events = run.events
    assert [e["event"] for e in events] == ABORT_THEN_NAN_EVENTS
    rejected = [e for e in events if e["event"] == "update_rejected"]
    assert [(e["round"], e["client"]) for e in rejected] == [(1, 3), (2, 3)]
    assert all("non-finite" in e["reason"] for e in rejected)
    run.spy.check_no_plaintext(run.dump, Ring.bits(32))  # round 2's sum: exactly the 9 plaintexts


# ------------------------------------------------------------------------------------------ strategies (no Ray)
@pytest.fixture(scope="module")
def round_one(small_data):
    """Round 1 of ``run_federated(small_cfg(), seed=0)``, trained once, in-process: the run's initial weights and
    the results of its 5 sampled clients, each from real local training on its MNIST shard with the run's task
    seed (FedAvg's client half, what every server-side strategy below receives). Read-only."""
    cfg = small_cfg()
    torch.manual_seed(0)  # run_federated's initial model
    model = build_model(cfg.model.name, small_data.num_classes, small_data.input_shape)
    layout = VectorLayout.of(model)
    x = layout.to_vector(model.state_dict())
    spec = ClientSpec(
        model=cfg.model.name,
        num_classes=small_data.num_classes,
        input_shape=small_data.input_shape,
        width=None,
        local=cfg.fl.local,
        strategy=cfg.fl.strategy,
    )
    sampled = sample_clients(small_data.num_clients, 5, seed=0, rnd=1, with_replacement=False)
    results = []
    with one_torch_thread():  # what FLClient sets, as in an actor; restored for the later tests
        client = FLClient(spec)
        for slot, cid in enumerate(sampled):
            shard = (small_data.clients[cid][0].numpy(), small_data.clients[cid][1].numpy())
            value = client.train(x.numpy(), shard, None, None, task_seed(0, 1, cid, slot))
            value["delta"].flags.writeable = False
            results.append((slot, cid, value))
    return layout, x, sampled, results


class HeldEncodings:
    """What a client actor holds after ``train_secure``: its participants' encodings of this round."""

    def __init__(self) -> None:
        self.held: dict[tuple[int, int], np.ndarray] = {}

    def secagg_vector(self, cid: int, round_id: int) -> np.ndarray | None:
        return self.held.pop((round_id, cid), None)


def in_process_secure_sum(
    hosts, round_id, vector_len, threshold, *, ring, session, timeout_s, allow_minority
):
    """``secure.secure_sum`` without Ray: the same protocol (keys, Shamir shares, masking, unmasking) run
    in-process over the encodings the hosts hold for this round."""
    vectors = {p: host.secagg_vector(p, round_id) for p, host in sorted(hosts.items())}
    assert all(v.shape == (vector_len,) for v in vectors.values())
    return secure_sum_local(
        vectors, threshold, ring, session=session, round_id=round_id, allow_minority=allow_minority
    )


def server_update_in_process(cfg, data, round_one, state_dir: Path) -> tuple[torch.Tensor, RoundSum]:
    """The server half of round 1 as ``FederatedServer.start_round``/``finish_round`` run it, without Ray: the
    strategy set up as ``run_federated`` does, the round's aggregation (``aggregation_for``: plain or secure)
    receiving the fixed client results -- as float32 updates, or encoded with the round's codec the way
    ``train_secure`` encodes them -- then ``finish`` and the strategy's server update of the mean."""
    layout, x, sampled, results = round_one
    strategy = check_fl_config(cfg)
    strategy.setup(layout, data.num_clients, state_dir, server_context(cfg, data, 0, layout))
    server = SimpleNamespace(fl=cfg.fl, strategy=strategy, sizes=data.client_sizes(), on_event=None)
    strategy.begin_round(1)
    start = strategy.client_weights(x)
    assert torch.equal(start, x) and not strategy.broadcast()  # what the fixed clients trained from
    agg = aggregation_for(cfg.fl)(server, 1, sampled, start.numel(), start)
    host = HeldEncodings()
    for slot, cid, value in results:
        if cfg.fl.secure_aggregation:
            n = value["num_samples"]
            weight = strategy.aggregation_weight(n)
            host.held[(1, slot)] = agg.codec.encode(value["delta"], weight, n, value["train_loss"])
            value = {"rejected": None, "seconds": value["seconds"]}
        assert agg.receive(slot, cid, value, host) is None
    total = agg.finish()
    assert total.skip_reason is None and total.count == len(sampled) == 5
    new = strategy.server_update(x, total.mean)
    strategy.end_round(True)
    return new, total


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
def test_strategy_server_update_on_secure_mean(small_data, round_one, tmp_path, monkeypatch, strategy):
    """The same 5 client updates (real local training on MNIST shards) aggregated by the plain path (float32
    fold) and by the secure path (fixed-point encodings, the real SecAgg protocol in-process, decode), then the
    strategy's server update applied to each mean: the weights differ only by how the mean was formed.

    Both paths are the server's own: ``aggregation_for`` picks PlainAggregation or SecureAggregation, whose
    ``finish`` (InOrderFold / ``secure_sum`` + ``UpdateCodec.decode``) gives the mean that the strategy's
    ``server_update`` applies, as in ``FederatedServer.finish_round``; only the SecAgg transport is in-process.

    Measured (seed 0): max |difference| 1.5e-8 to 3e-8 for all six, while the round moved the weights by
    1e-3 (FedAdagrad) to 7e-2 (FedAvg); asserted: below 1e-6."""
    monkeypatch.setattr(secure, "secure_sum", in_process_secure_sum)
    plain = small_cfg(strategy=strategy, rounds=1, secure_aggregation=False)
    sec = small_cfg(strategy=strategy, rounds=1)
    a, plain_sum = server_update_in_process(plain, small_data, round_one, tmp_path / "plain")
    b, secure_sum = server_update_in_process(sec, small_data, round_one, tmp_path / "secure")
    info = secure_sum.record["secagg"]
    assert info["included"] == 5 and info["max_quant_error"] < 1e-7 and info["clipped_fraction"] == 0
    assert secure_sum.grad_diversity is None and plain_sum.grad_diversity is not None
    x0 = round_one[1]
    moved = float((a - x0).abs().max())
    diff = float((a - b).abs().max())
    assert diff < 1e-6 < moved, (diff, moved)
