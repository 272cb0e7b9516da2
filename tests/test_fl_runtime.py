"""The FL runtime on Ray actors with real MNIST: learning, fault tolerance, exact resume, isolated control, CLI."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gptfl_ray.config import validate_config
from gptfl_ray.fl.client import FLClient, evaluate_sums
from gptfl_ray.fl.pool import IdleActors
from gptfl_ray.fl.runner import prepare_federated_data, run_federated
from gptfl_ray.io import load_weights, read_json, read_jsonl, save_weights
from gptfl_ray.models import build_model
from tests.cli_output import error_lines

ROUND_KEYS = {
    "round",
    "accuracy",
    "loss",
    "wall_time_s",
    "sampled",
    "bytes_down",
    "bytes_up",
    "params_down",
    "params_up",
    "cum_mb",
    "grad_diversity",
    "num_updates",
    "rejected",
    "failed_clients",
}
SUMMARY_KEYS = {
    "final_accuracy",
    "final_loss",
    "best_accuracy",
    "rounds",
    "rounds_to_target",
    "mb_to_target",
    "total_mb",
    "wall_time_s",
    "per_class_accuracy",
    "strategy",
    "seed",
    "init",
}

# Small workload for the fault and resume tests: 2,000 MNIST images over 10 clients, SCAFFOLD so that
# per-client state must survive actor deaths and checkpoints.
SMALL = {
    "data": {"dataset": "mnist", "test_split": "holdout", "num_test": 500, "num_train": 2000},
    "partition": {"method": "dirichlet", "num_clients": 10, "alpha": 0.5},
    "model": {"name": "cnn"},
    "fl": {
        "strategy": {"name": "scaffold"},
        "rounds": 4,
        "clients_per_round": 5,
        "checkpoint_every": 2,
        # plain SGD: SCAFFOLD's control-variate estimate (x − y)/(Kη) assumes it
        "local": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0}},
        "num_actors": 2,
    },
}


def small_cfg(**fl):
    raw = json.loads(json.dumps(SMALL))
    raw["fl"].update(fl)
    return validate_config(raw)


@pytest.fixture(scope="module")
def small_data(data_dir):
    return prepare_federated_data(small_cfg(), seed=0)


# ------------------------------------------------------------------------------------ the module's runs
def hooked_client(ctl: Path) -> type[FLClient]:
    """FLClient with the hooks the tests switch on by creating a file in ``ctl``. Each fires once, in the first task
    that renames its file to ``<name>.fired`` (atomic: exactly one task wins); with none armed it is FLClient.

    - ``kill``: a training task writes its actor's name to ``victim`` and lingers, so the test can ray.kill it;
    - ``hang``: a training task writes its pid to ``victim`` and hangs forever (alive, never answering); every later
      training task appends its actor's pid to ``after``;
    - ``crash``: an evaluation raises (a bug in an evaluation task aborts the run);
    - ``slow``: an evaluation takes 2 s longer (its actor's name in ``slowed``), so that what the other actor does
      meanwhile shows;
    - ``log/`` (a folder): every task appends its method, actor and start/end time to ``log/<actor>.jsonl``.
    """

    def fire(name: str) -> bool:
        import os

        try:
            os.rename(ctl / name, ctl / f"{name}.fired")
            return True
        except FileNotFoundError:
            return False

    def actor_name() -> str:
        import ray

        return ray.get_runtime_context().get_actor_name()

    class HookedClient(FLClient):
        def train(self, *args, **kwargs):
            import os

            if fire("kill"):
                (ctl / "victim").write_text(actor_name())
                time.sleep(60)
            elif fire("hang"):
                (ctl / "victim").write_text(str(os.getpid()))
                while True:
                    time.sleep(3600)
            elif (ctl / "hang.fired").exists():
                with open(ctl / "after", "a") as f:
                    f.write(f"{os.getpid()}\n")
            start = time.time()
            return self._logged("train", start, super().train(*args, **kwargs))

        def evaluate(self, *args):
            if fire("crash"):
                raise RuntimeError("evaluation crash (test)")
            start = time.time()
            if fire("slow"):
                (ctl / "slowed").write_text(actor_name())
                time.sleep(2.0)
            return self._logged("evaluate", start, super().evaluate(*args))

        def _logged(self, method: str, start: float, out):
            if (ctl / "log").is_dir():
                actor = actor_name()
                with open(ctl / "log" / f"{actor}.jsonl", "a") as f:
                    f.write(
                        json.dumps({"method": method, "actor": actor, "start": start, "end": time.time()})
                        + "\n"
                    )
            return out

    return HookedClient


class Runs:
    """The module's FL runs (``run_federated``, seed 0 unless given), on :func:`hooked_client` actors taken over
    from the previous run when it finished (``IdleActors``: adopted and rebuilt for the new run, as the arms of a
    seed in ``gptfl run`` are) instead of a new pool of processes each time. An interrupted or failed run stops its
    actors; the next starts new ones. Any test order is correct; the file's order is the cheap one: the tiny runs
    (whose reference must run on new actors) first, the one-actor runs last, then the tests whose Ray work does not
    go through here (``no_idle_actors``)."""

    def __init__(self, ctl: Path, idle: IdleActors):
        self.ctl, self.idle = ctl, idle
        self.client_cls = hooked_client(ctl)

    def __call__(self, cfg, *, out_dir: Path, seed: int = 0, **kwargs) -> dict:
        return run_federated(
            cfg, seed=seed, out_dir=out_dir, client_cls=self.client_cls, idle=self.idle, **kwargs
        )

    def arm(self, name: str) -> None:
        (self.ctl / name).touch()

    def arm_after_round(self, name: str, rnd: int):
        """An ``on_round`` that arms the hook ``name`` once round ``rnd`` is evaluated."""

        def on_round(rec):
            if rec["round"] == rnd:
                self.arm(name)

        return on_round


@pytest.fixture(scope="module")
def module_runs(ray_session, tmp_path_factory):
    """The module's :class:`Runs`; leaving the module stops the idle actors (they hold the session's CPUs)."""
    with IdleActors() as idle:
        ctl = tmp_path_factory.mktemp("hooks")
        yield Runs(ctl, idle)


@pytest.fixture
def runs(module_runs):
    """:class:`Runs` for one test: the hooks it armed (and their traces) are cleared afterwards."""
    yield module_runs
    shutil.rmtree(module_runs.ctl)
    module_runs.ctl.mkdir()


@pytest.fixture
def no_idle_actors(module_runs):
    """For Ray work outside :class:`Runs`: the idle actors are stopped first, as they hold the CPUs it needs."""
    module_runs.idle.close()


@pytest.fixture(scope="module")
def reference(module_runs, small_data, tmp_path_factory):
    """The uninterrupted SCAFFOLD run every fault/resume test must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    summary = module_runs(small_cfg(), out_dir=out, data=small_data)
    return out, summary


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_weights(path / "final.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ------------------------------------------------------------------------------------ overlap
def tiny_cfg(**fl):
    """tests/fl_runs.py's tiny MNIST run with 2 actors, 3 rounds, a checkpoint every round."""
    from tests.fl_runs import tiny_config

    return tiny_config({"name": "fedavg"}, fl={"num_actors": 2, "rounds": 3, **fl})


def untimed(recs: list[dict]) -> list[dict]:
    """Metrics records without their seconds (keys ending in ``_s``), which differ between any two runs."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in recs]


@pytest.fixture(scope="module")
def tiny_sequential(module_runs, data_dir, tmp_path_factory):
    """The tiny run in the sequential order: a blocking on_round makes each evaluation a barrier. On new actors
    (the idle ones are stopped first; a no-op when, as in file order, it is the module's first run): the adoption
    test compares its run on adopted actors with this one."""
    out = tmp_path_factory.mktemp("sequential")
    module_runs.idle.close()
    module_runs(tiny_cfg(), out_dir=out, on_round=lambda rec: None)
    return out


def test_evaluation_runs_alongside_next_round_with_identical_results(tiny_sequential, runs, tmp_path):
    """Round r's evaluation and round r+1's training share the actors (a training task starts while an
    evaluation still runs on the other actor); weights and metrics are those of the sequential order."""
    logs = runs.ctl / "log"
    logs.mkdir()
    runs.arm("slow")  # the run's first evaluation takes 2 s longer
    runs(tiny_cfg(), out_dir=tmp_path / "run")
    tasks = [json.loads(line) for f in logs.iterdir() for line in f.read_text().splitlines()]
    slow = max((t for t in tasks if t["method"] == "evaluate"), key=lambda t: t["end"] - t["start"])
    assert slow["actor"] == (runs.ctl / "slowed").read_text() and slow["end"] - slow["start"] >= 2.0
    assert any(
        t["method"] == "train" and t["actor"] != slow["actor"] and slow["start"] < t["start"] < slow["end"]
        for t in tasks
    )
    assert_same_weights(tmp_path / "run", tiny_sequential)
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in recs] == [1, 2, 3]
    assert untimed(recs) == untimed(read_jsonl(tiny_sequential / "metrics.jsonl"))


def test_checkpoint_waits_for_its_evaluation_and_resume_is_exact(tiny_sequential, runs, tmp_path):
    """Round 2 trains and aggregates, then its evaluation fails while round 3 trains: round 2's checkpoint is
    never committed (a checkpoint always holds its round's evaluation), and the resumed run redoes round 2
    and ends bit-identical to the sequential run."""
    out = tmp_path / "run"
    with pytest.raises(Exception, match="evaluation crash"):
        runs(tiny_cfg(), out_dir=out, on_round=runs.arm_after_round("crash", 1), on_round_overlaps=True)
    assert (runs.ctl / "crash.fired").exists()
    assert read_json(out / "checkpoint" / "latest.json")["round"] == 1
    assert [r["round"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    runs(tiny_cfg(), out_dir=out, resume=True)
    assert_same_weights(out, tiny_sequential)
    assert untimed(read_jsonl(out / "metrics.jsonl")) == untimed(
        read_jsonl(tiny_sequential / "metrics.jsonl")
    )


# ------------------------------------------------------------------------------------ learning
@pytest.mark.slow
def test_fedavg_learns_mnist(runs, data_dir, tmp_path):
    """FedAvg, CNN, 20 Dirichlet(0.5) clients of 8,000 real MNIST images, 10 per round.

    Measured (seed 0): accuracy 0.53 / 0.77 / 0.855 / 0.92 / 0.94 after rounds 1-5 on 2,000 held-out images.
    """
    cfg = validate_config(
        {
            "data": {"dataset": "mnist", "test_split": "holdout", "num_test": 2000},
            "partition": {"method": "dirichlet", "num_clients": 20, "alpha": 0.5},
            "model": {"name": "cnn"},
            "fl": {
                "strategy": {"name": "fedavg"},
                "rounds": 5,
                "clients_per_round": 10,
                "target_accuracy": 0.8,
                "local": {
                    "epochs": 1,
                    "batch_size": 32,
                    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                },
                "checkpoint_every": 0,
                "num_actors": 2,
            },
        }
    )
    data = prepare_federated_data(cfg, seed=0)
    seen = []
    s = runs(cfg, out_dir=tmp_path, data=data, on_round=seen.append)
    assert s["final_accuracy"] >= 0.90, s
    assert s["rounds_to_target"] is not None and s["rounds_to_target"] <= 4
    assert set(s) >= SUMMARY_KEYS and s["strategy"] == "fedavg" and s["init"] == "random" and s["rounds"] == 5

    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in recs] == [1, 2, 3, 4, 5] and [r["round"] for r in seen] == [1, 2, 3, 4, 5]
    assert all(set(r) >= ROUND_KEYS for r in recs)
    params = sum(p.numel() for p in build_model("cnn", 10, (1, 28, 28)).parameters())
    for r in recs:
        assert len(set(r["sampled"])) == 10 and r["num_updates"] == 10
        assert r["params_down"] == r["params_up"] == 10 * params and r["bytes_down"] == 4 * 10 * params
        assert r["grad_diversity"] > 0.1
    assert recs[-1]["cum_mb"] == pytest.approx(5 * 2 * 4 * 10 * params / 1e6)
    assert s["mb_to_target"] == pytest.approx(recs[s["rounds_to_target"] - 1]["cum_mb"])
    assert recs[-1]["accuracy"] > recs[0]["accuracy"]

    # final.safetensors is the evaluated model: re-evaluating it reproduces the reported accuracy
    model = build_model("cnn", 10, data.input_shape)
    model.load_state_dict(weights(tmp_path))
    ev = evaluate_sums(model, data.test[0], data.test[1], 10, 512)
    assert ev["correct"].sum() / ev["count"].sum() == pytest.approx(s["final_accuracy"])
    assert (tmp_path / "checkpoint" / "latest.json").is_file()  # checkpoint_every=0: only at the end


# ------------------------------------------------------------------------------------ resume
class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_identical_weights(reference, runs, small_data, tmp_path):
    def stop_after_round_3(rec):
        if rec["round"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        runs(small_cfg(), out_dir=tmp_path, data=small_data, on_round=stop_after_round_3)
    assert read_json(tmp_path / "checkpoint" / "latest.json")["round"] == 2
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 3
    assert not (tmp_path / "final.safetensors").exists()

    s = runs(small_cfg(), out_dir=tmp_path, data=small_data, resume=True)
    assert_same_weights(tmp_path, reference[0])  # bit-identical, SCAFFOLD state included
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in recs] == [1, 2, 3, 4]
    ref = read_jsonl(reference[0] / "metrics.jsonl")
    assert [r["accuracy"] for r in recs] == [r["accuracy"] for r in ref]
    assert s["total_mb"] == pytest.approx(reference[1]["total_mb"])
    # SCAFFOLD's per-client control variates: one file per client that has taken part
    seen = {c for r in ref for c in r["sampled"]}
    assert len(list((tmp_path / "state" / "scaffold").iterdir())) == len(seen)

    with pytest.raises(ValueError, match="used seed 0, not 1"):
        runs(small_cfg(), seed=1, out_dir=tmp_path, data=small_data, resume=True)
    with pytest.raises(ValueError, match="started from random init"):
        runs(
            small_cfg(),
            out_dir=tmp_path,
            data=small_data,
            resume=True,
            init_weights=tmp_path / "other.safetensors",
        )
    with pytest.raises(ValueError, match="already holds an FL run"):
        runs(small_cfg(), out_dir=tmp_path, data=small_data)
    with pytest.raises(ValueError, match=r"different fl\.strategy"):
        runs(small_cfg(strategy={"name": "fedavg"}), out_dir=tmp_path, data=small_data, resume=True)


# ------------------------------------------------------------------------------------ faults
def kill_when_fired(ctl: Path) -> threading.Thread:
    """ray.kill the actor that the ``kill`` hook names in ``ctl / "victim"``. An adopted actor keeps the namespace
    of the run that started it (its own job's namespace is the driver's), so it is looked up in all of them: the
    live actors are the running run's, whose names differ."""
    import ray

    def kill():
        deadline = time.time() + 120
        while not (ctl / "victim").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        name = (ctl / "victim").read_text()
        found = [a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == name]
        assert len(found) == 1, (name, found)
        ray.kill(ray.get_actor(name, namespace=found[0]))

    t = threading.Thread(target=kill, daemon=True)
    t.start()
    return t


def test_killed_actor_work_is_redispatched(reference, runs, small_data, tmp_path):
    out = tmp_path / "run"
    killer = kill_when_fired(runs.ctl)
    s = runs(small_cfg(), out_dir=out, data=small_data, on_round=runs.arm_after_round("kill", 1))
    killer.join(timeout=5)
    recs = read_jsonl(out / "metrics.jsonl")
    assert len(recs[1]["failed_clients"]) == 1 and recs[1]["lost_clients"] == []
    assert all(r["num_updates"] == 5 for r in recs) and s["failed_clients"] == 1
    assert recs[1]["bytes_down"] > recs[0]["bytes_down"]  # the re-dispatch was sent again
    events = read_jsonl(out / "events.jsonl")
    assert [e["event"] for e in events] == ["actor_died"] and events[0]["client"] == recs[1][
        "failed_clients"
    ][0]
    assert_same_weights(out, reference[0])  # the re-dispatched task reproduced the lost update exactly


def test_hung_actor_times_out_and_its_work_is_redispatched(reference, runs, small_data, tmp_path):
    """fl.task_timeout_s: a task past it is a lost client; the hung actor is killed and replaced, the task
    re-dispatched, and the run still reproduces the reference bit for bit."""
    out = tmp_path / "run"
    timeout = 5.0  # far above a task of this workload (< 1 s), far below "forever"
    cfg = small_cfg(task_timeout_s=timeout)
    s = runs(cfg, out_dir=out, data=small_data, on_round=runs.arm_after_round("hang", 1))
    recs = read_jsonl(out / "metrics.jsonl")
    assert len(recs[1]["failed_clients"]) == 1 and recs[1]["lost_clients"] == []
    assert all(r["num_updates"] == 5 for r in recs) and s["failed_clients"] == 1
    events = read_jsonl(out / "events.jsonl")
    assert [e["event"] for e in events] == ["task_timeout"]
    assert events[0]["client"] == recs[1]["failed_clients"][0] and events[0]["seconds"] >= timeout
    # the hung actor no longer holds its slot: two live actors, neither of them the victim, ran the later tasks
    after = set((runs.ctl / "after").read_text().split())
    assert len(after) == 2 and (runs.ctl / "victim").read_text() not in after
    assert_same_weights(out, reference[0])


def test_faults_without_retries_poisoned_client_and_dead_actor(runs, small_data, tmp_path):
    """client_retries=0: a killed actor's client is lost and the round aggregates the survivors; a client
    with poisoned (NaN) images sends a non-finite update every round and is rejected each time."""
    data = dataclasses.replace(small_data, clients=list(small_data.clients))  # the module's stays clean
    data.clients[3] = (torch.full_like(data.clients[3][0], float("nan")), data.clients[3][1])
    out = tmp_path / "run"
    killer = kill_when_fired(runs.ctl)
    local = {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}}
    cfg = small_cfg(
        rounds=2, clients_per_round=10, client_retries=0, local=local, strategy={"name": "fedavg"}
    )
    s = runs(cfg, out_dir=out, data=data, on_round=runs.arm_after_round("kill", 1))
    killer.join(timeout=5)
    r1, r2 = read_jsonl(out / "metrics.jsonl")
    assert r1["rejected"] == [3] and r1["num_updates"] == 9 and r1["lost_clients"] == []
    # the first task of round 2 (client 0 or 1) ran on the killed actor
    assert r2["rejected"] == [3] and r2["num_updates"] == 8 and not r2["skipped"]
    assert r2["lost_clients"] == r2["failed_clients"] and r2["lost_clients"][0] in (0, 1)
    assert r2["bytes_up"] == 9 * r1["bytes_up"] // 10  # 9 results received (one rejected), one lost
    assert np.isfinite(s["final_loss"]) and s["final_accuracy"] > 0.15  # chance: 0.1
    assert all(torch.isfinite(w).all() for w in weights(out).values())
    kinds = [e["event"] for e in read_jsonl(out / "events.jsonl")]
    assert kinds.count("update_rejected") == 2 and kinds.count("actor_died") == 1
    reasons = [e["reason"] for e in read_jsonl(out / "events.jsonl") if e["event"] == "update_rejected"]
    assert all("non-finite" in r for r in reasons)


def test_update_norm_bound_rejects_and_skips_round(runs, small_data, tmp_path):
    """A norm bound below every update: all rejected, the round is skipped, the model stays at its init."""
    init = tmp_path / "init.safetensors"
    torch.manual_seed(1)
    save_weights(init, build_model("cnn", 10, (1, 28, 28)).state_dict())
    cfg = small_cfg(rounds=1, max_update_norm=1e-6, num_actors=1, strategy={"name": "fedavg"})
    s = runs(cfg, out_dir=tmp_path / "norm", data=small_data, init_weights=init)
    rec = read_jsonl(tmp_path / "norm" / "metrics.jsonl")[0]
    assert rec["skipped"] and rec["num_updates"] == 0 and len(rec["rejected"]) == 5
    assert s["skipped_rounds"] == [1] and s["init"] == str(init)
    w0, w1 = load_weights(init), weights(tmp_path / "norm")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


# ------------------------------------------------------------------------------------ isolated control
def test_isolated_control(runs, small_data, tmp_path):
    cfg = small_cfg(mode="isolated", isolated_clients=3, isolated_epochs=2, num_actors=1)
    s = runs(cfg, out_dir=tmp_path, data=small_data)
    accs = s["isolated_accuracies"]
    assert len(accs) == 3 and len(set(s["isolated_clients"])) == 3 and s["isolated_epochs"] == 2
    assert s["isolated_mean_accuracy"] == pytest.approx(np.mean(accs))
    assert s["isolated_std_accuracy"] == pytest.approx(np.std(accs))
    assert all(0.05 < a < 1 for a in accs)
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert sorted(r["client"] for r in lines) == s["isolated_clients"]
    assert [r["num_samples"] for r in lines] == [len(small_data.clients[c][1]) for c in s["isolated_clients"]]
    # resuming a finished control retrains nothing and reports the same numbers
    again = runs(cfg, out_dir=tmp_path, data=small_data, resume=True)
    assert again["isolated_accuracies"] == accs and len(read_jsonl(tmp_path / "metrics.jsonl")) == 3


# ------------------------------------------------------------------------------------ actor reuse and queueing
def test_a_later_run_adopts_the_idle_actors_and_matches_fresh_ones(
    tiny_sequential, no_idle_actors, tmp_path, caplog
):
    """IdleActors (what `gptfl run` does for the arms of a seed): the second run takes over the first run's
    actors, rebuilt for another model and strategy, and ends bit-identical to the run on fresh actors; leaving
    the scope stops them."""
    import os

    from tests.fl_runs import tiny_config

    def pids() -> set[int]:
        lines = [re.search(r"fl-client-\d+: pid (\d+)", r.getMessage()) for r in caplog.records]
        found = {int(m.group(1)) for m in lines if m}
        caplog.clear()
        return found

    other = tiny_config(
        {"name": "fedprox", "mu": 0.1}, fl={"num_actors": 2, "rounds": 1}, model={"name": "cnn"}
    )
    caplog.clear()
    with caplog.at_level("INFO", logger="gptfl_ray.fl.pool"), IdleActors() as idle:
        run_federated(other, seed=3, out_dir=tmp_path / "other", idle=idle)
        first = pids()
        run_federated(tiny_cfg(), seed=0, out_dir=tmp_path / "run", on_round=lambda rec: None, idle=idle)
        assert pids() == first and len(first) == 2
    assert_same_weights(tmp_path / "run", tiny_sequential)
    assert untimed(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == untimed(
        read_jsonl(tiny_sequential / "metrics.jsonl")
    )
    deadline = time.time() + 30
    while any(os.path.exists(f"/proc/{pid}") for pid in first) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in first)


def make_sleeper():
    """A bare pool actor (no model, nothing to import: defined here, it travels by value): ``work`` sleeps and
    reports when it started; ``hang_once`` hangs on its first call anywhere (a marker file), then returns."""

    class Sleeper:
        def __init__(self, spec):
            self.marker = spec

        def info(self) -> dict:
            import os

            return {"pid": os.getpid(), "device": "cpu", "torch_threads": 1}

        def work(self, seconds: float) -> float:
            start = time.time()
            time.sleep(seconds)
            return start

        def hang_once(self) -> float:
            import os

            start = time.time()
            try:
                os.mkdir(self.marker)
            except FileExistsError:
                return start
            while True:
                time.sleep(3600)

    return Sleeper


def test_pool_keeps_a_task_queued_per_actor_and_requeues_unstarted_work(no_idle_actors, tmp_path):
    """Each actor holds a second task behind its running one; run()'s tasks go ahead of submitted ones;
    a hung actor's queued task never started, so it returns to the queue uncounted."""
    from gptfl_ray.fl.pool import ClientPool, Task, TaskDeadlines

    events: list[dict] = []
    pool = ClientPool(
        str(tmp_path / "hung"),
        2,
        num_cpus=0.5,
        num_gpus=0,
        namespace="test-queue",
        max_replacements=1,
        actor_cls=make_sleeper(),
        on_event=events.append,
        deadlines=TaskDeadlines(2.0),
    )
    try:
        pool.wait_ready()
        later = [Task(i, "work", (0.0,)) for i in range(4)]
        pool.submit(later, retries=0)
        first = [Task(i, "work", (0.5,)) for i in range(2)]
        starts = {o.task.key: o.value for o in pool.run(first, retries=0)}
        later_starts = [o.value for o in pool.run(later, retries=0)]
        assert pool.peak_depth == 2 and len(later_starts) == 4
        assert max(starts.values()) < min(later_starts)  # the submitted tasks waited behind run()'s
        # slot 0: [hang_once, work 2 queued behind it], slot 1: [work 1]; the hang passes its deadline
        tasks = [Task(0, "hang_once", ())] + [Task(i, "work", (0.0,)) for i in (1, 2, 3)]
        outs = {o.task.key: o for o in pool.run(tasks, retries=1)}
        assert sorted(outs) == [0, 1, 2, 3] and all(o.error is None for o in outs.values())
        assert [t.dispatches for t in tasks] == [2, 1, 1, 1]
        assert [e["event"] for e in events] == ["task_timeout"] and events[0]["client"] is None
    finally:
        pool.shutdown()


# ------------------------------------------------------------------------------------ CLI
def write_cfg(tmp_path: Path, **fl) -> Path:
    import yaml

    raw = json.loads(json.dumps(SMALL))
    raw["fl"].update(fl)
    path = tmp_path / "fl.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_federate_and_resume(no_idle_actors, data_dir, tmp_path, capsys):
    from gptfl_ray.cli import main

    cfg = write_cfg(tmp_path, rounds=2, num_actors=1, strategy={"name": "fedprox", "mu": 0.01})
    out = tmp_path / "run"
    assert main(["federate", str(cfg), "--output", str(out), "--seed", "1"]) == 0
    assert "fedprox: final accuracy" in capsys.readouterr().out
    s = read_json(out / "summary.json")
    assert s["seed"] == 1 and s["rounds"] == 2 and s["strategy"] == "fedprox"
    # resuming a finished run re-trains nothing and keeps the result
    assert main(["federate", str(cfg), "--resume", str(out)]) == 0
    assert read_json(out / "summary.json")["final_accuracy"] == s["final_accuracy"]
    assert len(read_jsonl(out / "metrics.jsonl")) == 2


def test_cli_errors_are_one_line(data_dir, tmp_path, capsys):
    from gptfl_ray.cli import main

    assert main(["federate", str(write_cfg(tmp_path, strategy={"name": "fedprox", "mu": -1}))]) == 2
    assert "fl.strategy.mu" in capsys.readouterr().err
    wrong = tmp_path / "wrong.safetensors"
    save_weights(wrong, build_model("cnn", 7, (1, 28, 28)).state_dict())
    cfg = write_cfg(tmp_path)
    assert main(["federate", str(cfg), "--init", str(wrong), "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(wrong) in err and "shape" in err and len(error_lines(err)) == 1
    assert main(["federate", str(cfg), "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not an FL run folder" in capsys.readouterr().err
    assert main(["federate", str(write_cfg(tmp_path, secure_aggregation=True))]) == 2
    assert "fl.secure_aggregation" in capsys.readouterr().err
