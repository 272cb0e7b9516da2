"""FL strategy math against hand-computed values on tiny tensors, plus the runtime's building blocks (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gptfl_ray.config import ConfigError, LocalTrainConfig, OptimizerConfig, StrategyConfig
from gptfl_ray.fl.aggregate import GradientDiversity, WeightedSum, check_vector
from gptfl_ray.fl.checkpoint import Checkpoint, latest_round, load_checkpoint, save_checkpoint
from gptfl_ray.fl.client import ClientSpec, FLClient, local_train, task_seed
from gptfl_ray.fl.client_state import ClientStateStore
from gptfl_ray.fl.flat import FlatModel, VectorLayout
from gptfl_ray.fl.metrics import eval_metrics, isolated_summary
from gptfl_ray.fl.server import sample_clients
from gptfl_ray.fl.strategies import STRATEGIES, ClientContext, build_strategy

T = torch.tensor


class TwoParams(nn.Module):
    """2 trainable values + 2 float buffers + 1 int buffer: layout [w, b | running_mean, running_var]."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(T([0.0]))
        self.b = nn.Parameter(T([0.0]))
        self.register_buffer("running_mean", T([0.0]))
        self.register_buffer("running_var", T([1.0]))
        self.register_buffer("num_batches_tracked", torch.tensor(0))


def strategy(name: str, tmp_path=None, num_clients: int = 4, **params):
    s = build_strategy(StrategyConfig(name=name, **params))
    s.setup(VectorLayout.of(TwoParams()), num_clients, tmp_path)
    return s


def mean_of(updates: list[tuple[list[float], float]], s) -> torch.Tensor:
    acc = WeightedSum(len(updates[0][0]))
    for delta, n in updates:
        acc.add(T(delta), s.aggregation_weight(n))
    return acc.mean()


# ------------------------------------------------------------------------------------ FedAvg
def test_fedavg_sample_weighted_and_unweighted():
    updates = [([1.0, 0.0, 2.0, 4.0], 1), ([4.0, 2.0, 0.0, 0.0], 3)]
    x = T([10.0, 20.0, 0.5, 2.0])
    s = strategy("fedavg")
    # (1·Δ1 + 3·Δ2) / 4
    assert torch.allclose(mean_of(updates, s), T([3.25, 1.5, 0.5, 1.0]))
    assert torch.allclose(s.server_update(x, mean_of(updates, s)), T([13.25, 21.5, 1.0, 3.0]))
    u = strategy("fedavg", weighted=False)  # the official code's plain mean
    assert torch.allclose(mean_of(updates, u), T([2.5, 1.0, 1.0, 2.0]))
    # server_lr scales the parameter part only; float buffers are always averaged
    h = strategy("fedavg", server_lr=0.5)
    assert torch.allclose(h.server_update(x, mean_of(updates, h)), T([11.625, 20.75, 1.0, 3.0]))


# ------------------------------------------------------------------------------------ FedProx
def test_fedprox_gradient_is_proximal_term():
    s = strategy("fedprox", mu=0.1)
    ctx = ClientContext(global_params=T([0.0, 4.0]), lr=0.1)
    grads = T([0.5, 0.5])
    s.adjust_gradients(T([1.0, 2.0]), grads, ctx)
    assert torch.allclose(grads, T([0.5 + 0.1 * 1.0, 0.5 + 0.1 * -2.0]))  # g + μ(w − w_g)


def test_fedprox_local_step_equals_autograd_on_proximal_objective():
    """One SGD step through local_train == one step on CE + μ/2‖w − w_g‖² differentiated by autograd."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    ref = nn.Linear(3, 2)
    g = [p.detach().clone() for p in ref.parameters()]
    with torch.no_grad():  # start away from the global weights so the term is non-zero
        for p in ref.parameters():
            p.add_(0.3)
    model = nn.Linear(3, 2)
    model.load_state_dict(ref.state_dict())
    mu, lr = 0.5, 0.1
    loss = nn.functional.cross_entropy(ref(x), y)
    loss = loss + mu / 2 * sum(((p - q) ** 2).sum() for p, q in zip(ref.parameters(), g, strict=True))
    loss.backward()
    expected = [p.detach() - lr * p.grad for p in ref.parameters()]

    flat = FlatModel(model, VectorLayout.of(model))
    opt = torch.optim.SGD([flat.param], lr=lr)
    ctx = ClientContext(global_params=torch.cat([q.reshape(-1) for q in g]), lr=lr)
    steps, _ = local_train(
        flat,
        opt,
        strategy("fedprox", mu=mu),
        ctx,
        x,
        y,
        epochs=1,
        batch_size=8,
        generator=torch.Generator().manual_seed(0),
    )
    assert steps == 1
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(p, e, atol=1e-6)


# ------------------------------------------------------------------------------------ SCAFFOLD
def test_scaffold_control_variates(tmp_path):
    s = strategy("scaffold", tmp_path, num_clients=4)
    s.c = T([0.5, 0.0])
    # client half: gradient correction c − c_i, then Δc_i = (x − y)/(K·η) − c
    ctx = ClientContext(
        global_params=T([1.0, 1.0]), lr=0.1, broadcast={"c": s.c}, state={"c_i": T([0.25, 0.5])}
    )
    s.client_begin(ctx)
    grads = T([1.0, 1.0])
    s.adjust_gradients(T([0.0, 0.0]), grads, ctx)
    assert torch.allclose(grads, T([1.25, 0.5]))
    dc = s.client_end(ctx, T([0.8, 1.2]), steps=2)["delta_c"]
    assert torch.allclose(dc, T([0.2 / 0.2 - 0.5, -0.2 / 0.2 - 0.0]))  # [0.5, -1]
    # server half: c_i ← c_i + Δc_i (per virtual client, persisted), c ← c + ΣΔc_i / N
    s.accept(3, 1, {"delta_c": dc})
    s.end_round(applied=True)
    assert torch.allclose(s.c, T([0.5 + 0.5 / 4, -1.0 / 4]))
    assert torch.allclose(s.client_state(3)["c_i"], T([0.5, -1.0]))
    assert s.client_state(2) is None  # never sampled: c_i = 0
    # a client without state corrects by c alone
    ctx2 = ClientContext(global_params=T([1.0, 1.0]), lr=0.1, broadcast={"c": s.c})
    s.client_begin(ctx2)
    assert torch.allclose(ctx2.scratch["correction"], s.c)
    # x moves by η_g·mean(Δy); buffers are averaged
    assert torch.allclose(
        s.server_update(T([1.0, 1.0, 0.0, 1.0]), T([0.2, -0.2, 0.1, 0.0])), T([1.2, 0.8, 0.1, 1.0])
    )


def test_scaffold_state_survives_checkpoint_and_dropped_rounds(tmp_path):
    s = strategy("scaffold", tmp_path)
    s.accept(1, 1, {"delta_c": T([1.0, 1.0])})
    s.end_round(applied=True)
    tensors, meta = s.state_dict()
    s.checkpoint_committed()
    # round 2 is applied but not checkpointed; round 3 is dropped (too few updates)
    s.accept(1, 2, {"delta_c": T([2.0, 0.0])})
    s.end_round(applied=True)
    assert torch.allclose(s.client_state(1)["c_i"], T([3.0, 1.0]))
    s.accept(1, 3, {"delta_c": T([5.0, 5.0])})
    c_before = s.c.clone()
    s.end_round(applied=False)
    assert torch.allclose(s.c, c_before) and torch.allclose(s.client_state(1)["c_i"], T([3.0, 1.0]))
    # resume from the checkpoint: back to round 1's state, newer files gone
    r = strategy("scaffold", tmp_path)
    r.load_state_dict(tensors, meta)
    assert torch.allclose(r.c, T([0.25, 0.25]))
    assert torch.allclose(r.client_state(1)["c_i"], T([1.0, 1.0]))
    assert sorted(f.name for f in (tmp_path / "scaffold").iterdir()) == ["1.r1.safetensors"]


def test_client_state_store_keeps_only_needed_versions(tmp_path):
    st = ClientStateStore(tmp_path)
    for rnd in (1, 2, 3):
        st.put(7, rnd, {"c_i": T([float(rnd)])})
        st.apply_round()
        if rnd == 1:
            st.commit_checkpoint()
    # the checkpointed version (r1) and the current one (r3); r2 was superseded
    assert sorted(f.name for f in tmp_path.iterdir()) == ["7.r1.safetensors", "7.r3.safetensors"]
    st.commit_checkpoint()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["7.r3.safetensors"]
    assert st.get(7)["c_i"].item() == 3.0
    with pytest.raises(FileNotFoundError, match="missing"):
        ClientStateStore(tmp_path).restore({"8": 2})


# ------------------------------------------------------------------------------------ FedOpt
ETA, B1, B2, TAU = 0.1, 0.9, 0.99, 0.01
X0, D = [1.0, 2.0], [0.1, -0.2]


def _fedopt_expected(v_fn):
    out = []
    for x, d in zip(X0, D, strict=True):
        m = (1 - B1) * d  # m₀ = 0
        v = v_fn(TAU**2, d * d)  # v₀ = τ²
        out.append(x + ETA * m / (math.sqrt(v) + TAU))
    return out


@pytest.mark.parametrize(
    ("name", "v_fn"),
    [
        ("fedadagrad", lambda v, d2: v + d2),
        ("fedadam", lambda v, d2: B2 * v + (1 - B2) * d2),
        ("fedyogi", lambda v, d2: v - (1 - B2) * d2 * math.copysign(1.0, v - d2)),
    ],
)
def test_fedopt_one_server_step(name, v_fn):
    s = strategy(name, server_lr=ETA, beta1=B1, beta2=B2, tau=TAU)
    new = s.server_update(T([*X0, 5.0, 6.0]), T([*D, 1.0, -1.0]))
    assert torch.allclose(new[:2], T(_fedopt_expected(v_fn)), rtol=1e-6)
    assert torch.allclose(new[2:], T([6.0, 5.0]))  # buffers: plain average
    tensors, _ = s.state_dict()
    assert torch.allclose(tensors["m"], T([(1 - B1) * d for d in D]))
    assert torch.allclose(tensors["v"], T([v_fn(TAU**2, d * d) for d in D]))


def test_yogi_adam_adagrad_differ_on_second_step():
    """Yogi's additive update keeps v larger than Adam's decay when the gradient shrinks."""
    vs = {}
    for name in ("fedadagrad", "fedadam", "fedyogi"):
        s = strategy(name, server_lr=ETA, beta1=B1, beta2=B2, tau=TAU)
        x = s.server_update(T([0.0, 0.0, 0.0, 0.0]), T([1.0, 1.0, 0.0, 0.0]))
        s.server_update(x, T([0.01, 0.01, 0.0, 0.0]))
        vs[name] = s.v[0].item()
    d1, d2, v0 = 1.0, 1e-4, TAU**2
    assert vs["fedadagrad"] == pytest.approx(v0 + d1 + d2, rel=1e-5)
    v1 = B2 * v0 + (1 - B2) * d1
    assert vs["fedadam"] == pytest.approx(B2 * v1 + (1 - B2) * d2, rel=1e-5)
    v1 = v0 + (1 - B2) * d1  # v0 < d1: v grows
    assert vs["fedyogi"] == pytest.approx(v1 - (1 - B2) * d2, rel=1e-5)  # v1 > d2: v shrinks additively


# ------------------------------------------------------------------------------------ FedAvgM
def test_fedavgm_server_momentum():
    s = strategy("fedavgm", server_lr=1.0, momentum=0.9)
    x = s.server_update(T([0.0, 0.0, 0.0, 1.0]), T([1.0, 0.0, 0.5, 0.0]))
    assert torch.allclose(x, T([1.0, 0.0, 0.5, 1.0]))
    x = s.server_update(x, T([0.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(x, T([1.0 + 0.9, 1.0, 0.5, 1.0]))  # v = 0.9·[1, 0] + [0, 1]


# ------------------------------------------------------------------------------------ registry
def test_registry_and_parameter_errors_name_the_field():
    assert {"fedavg", "fedprox", "scaffold", "fedadam", "fedyogi", "fedadagrad", "fedavgm"} <= set(STRATEGIES)
    with pytest.raises(ConfigError, match=r"fl\.strategy\.name: unknown strategy 'fedsgd'"):
        build_strategy(StrategyConfig(name="fedsgd"))
    with pytest.raises(ConfigError, match=r"fl\.strategy\.mu: .*greater than or equal to 0"):
        build_strategy(StrategyConfig(name="fedprox", mu=-1))
    with pytest.raises(ConfigError, match=r"fl\.strategy\.muu: unknown parameter"):
        build_strategy(StrategyConfig(name="fedprox", muu=0.1))
    with pytest.raises(ConfigError, match=r"fl\.strategy\.mu: unknown parameter \(fedavg\)"):
        build_strategy(StrategyConfig(name="fedavg", mu=0.1))
    assert build_strategy(StrategyConfig(name="fedyogi", tau=0.1)).params.tau == 0.1


# ------------------------------------------------------------------------------------ aggregation
def test_update_validation():
    assert check_vector(T([3.0, 4.0]), 2) == (None, 5.0)
    assert "non-finite" in check_vector(T([1.0, float("nan")]), 2)[0]
    assert "non-finite" in check_vector(T([float("inf"), 0.0]), 2)[0]
    assert "wrong shape" in check_vector(T([1.0, 2.0, 3.0]), 2)[0]
    assert "wrong shape" in check_vector(T([1.0, 2.0], dtype=torch.float64), 2)[0]
    assert "max_update_norm" in check_vector(T([3.0, 4.0]), 2, max_norm=4.9)[0]
    assert check_vector(T([3e30, 4e30]), 2)[0] is None  # float64 norm: no overflow


def test_gradient_diversity():
    def div(*vs):
        g = GradientDiversity(2)
        for v in vs:
            g.add(T(v), float(torch.linalg.vector_norm(T(v))))
        return g.value()

    # Yin et al. 2018: Σ‖Δ_i‖² / ‖ΣΔ_i‖², plain sums
    assert div([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)  # orthogonal: (1 + 1) / 2
    assert div([3.0, 0.0], [0.0, 0.5]) == pytest.approx(1.0)  # orthogonal, any norms: 1
    assert div([1.0, 0.0], [1.0, 0.0]) == pytest.approx(0.5)  # identical: 2 / 4 = 1/K
    assert div([1.0, 2.0], [1.0, 2.0], [1.0, 2.0]) == pytest.approx(1 / 3)  # K = 3 identical: 1/K
    assert div([1.0, 2.0]) == pytest.approx(1.0)  # one update
    assert div([2.0, 0.0], [-1.0, 0.0]) == pytest.approx(5.0)  # conflicting: (4 + 1) / 1
    assert div([1.0, 0.0], [-1.0, 0.0]) is None  # cancel out exactly


def test_eval_metrics_and_isolated_summary():
    parts = [
        {"loss_sum": 2.0, "correct": np.array([1, 0, 2]), "count": np.array([2, 0, 2])},
        {"loss_sum": 4.0, "correct": np.array([1, 0, 0]), "count": np.array([1, 0, 1])},
    ]
    m = eval_metrics(parts)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["loss"] == pytest.approx(1.0)
    assert m["per_class_accuracy"] == [pytest.approx(2 / 3), None, pytest.approx(2 / 3)]
    s = isolated_summary([0.5, 0.7, 0.9])
    assert s["isolated_mean_accuracy"] == pytest.approx(0.7)
    assert s["isolated_std_accuracy"] == pytest.approx(math.sqrt(0.08 / 3))


# ------------------------------------------------------------------------------------ flat vectors
def test_vector_layout_round_trip_with_buffers():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    layout = VectorLayout.of(m)
    assert layout.num_trainable == sum(p.numel() for p in m.parameters())
    assert layout.size == layout.num_trainable + 4  # running_mean + running_var, not num_batches_tracked
    sd = m.state_dict()
    sd["1.num_batches_tracked"] = torch.tensor(7)
    vec = layout.to_vector(sd)
    back = layout.to_state_dict(vec, sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="expected"):
        layout.to_state_dict(vec[:-1], sd)


def test_flat_model_trains_bit_identically_to_per_parameter_sgd():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    b.load_state_dict(a.state_dict())
    flat = FlatModel(b, VectorLayout.of(b))
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ob = torch.optim.SGD([flat.param], lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(5):
        oa.zero_grad()
        nn.functional.cross_entropy(a(x), y).backward()
        oa.step()
        flat.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        ob.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert torch.equal(flat.vector(), torch.cat([p.detach().reshape(-1) for p in a.parameters()]))


def test_client_task_is_a_function_of_its_seed():
    spec = ClientSpec(
        model="cnn",
        num_classes=10,
        input_shape=(1, 28, 28),
        width=None,
        local=LocalTrainConfig(batch_size=8, optimizer=OptimizerConfig(lr=0.05)),
        strategy=StrategyConfig(name="fedavg"),
    )
    a, b = FLClient(spec), FLClient(spec)
    g = torch.Generator().manual_seed(1)
    shard = (
        torch.randn(20, 1, 28, 28, generator=g).numpy(),
        torch.randint(0, 10, (20,), generator=g).numpy(),
    )
    w = a.layout.to_vector(a.flat.model.state_dict()).numpy()
    r1 = a.train(w, shard, None, None, seed=5)
    b.train(w, shard, None, None, seed=6)  # different history on b
    r2 = b.train(w, shard, None, None, seed=5)
    assert r1["steps"] == 3 and r1["num_samples"] == 20 and r1["delta"].dtype == np.float32
    assert np.array_equal(r1["delta"], r2["delta"])
    assert not np.array_equal(r1["delta"], a.train(w, shard, None, None, seed=6)["delta"])
    assert len({task_seed(0, 1, c) for c in range(100)} | {task_seed(0, 2, 0), task_seed(1, 1, 0)}) == 102


# ------------------------------------------------------------------------------------ sampling
def test_client_sampling():
    s = sample_clients(100, 10, seed=0, rnd=1, with_replacement=False)
    assert len(set(s)) == 10 and s == sample_clients(100, 10, seed=0, rnd=1, with_replacement=False)
    assert s != sample_clients(100, 10, seed=0, rnd=2, with_replacement=False)
    assert s != sample_clients(100, 10, seed=1, rnd=1, with_replacement=False)
    assert sample_clients(5, 10, seed=0, rnd=1, with_replacement=False) == [0, 1, 2, 3, 4]
    draws = [sample_clients(10, 8, seed=0, rnd=r, with_replacement=True) for r in range(1, 6)]
    assert all(len(d) == 8 for d in draws) and any(len(set(d)) < 8 for d in draws)


# ------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_commit_and_round_trip(tmp_path):
    def ckpt(rnd):
        return Checkpoint(
            rnd,
            {"w": T([float(rnd)])},
            {"m": T([1.0])},
            {"progress": {"cum_bytes": rnd}},
            [{"round": r} for r in range(1, rnd + 1)],
        )

    assert latest_round(tmp_path) is None and load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, ckpt(2))
    (tmp_path / "round-000004").mkdir()  # debris of an interrupted write: not committed, ignored
    assert load_checkpoint(tmp_path).round == 2
    save_checkpoint(tmp_path, ckpt(4))
    c = load_checkpoint(tmp_path)
    assert c.round == 4 and c.global_state["w"].item() == 4.0 and len(c.metrics) == 4
    assert c.state["progress"]["cum_bytes"] == 4
    # the debris is gone; the previous checkpoint stays until the next commit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "round-000002", "round-000004"]


def test_updates_fold_in_sampled_order_whatever_the_arrival_order():
    from gptfl_ray.fl.server import InOrderFold

    class Recorder(type(strategy("fedavg"))):
        def accept(self, cid, rnd, uploads):
            self.seen.append(cid)

    def item(cid, values):
        return cid, {
            "delta": np.array(values, dtype=np.float32),
            "num_samples": 1,
            "train_loss": 0.0,
            "uploads": {},
        }

    # float32 addition is not associative: 1e8 + 1 − 1e8 depends on the order
    items = [item(10, [1e8, 0.0]), item(11, [1.0, 1.0]), item(12, [-1e8, 2.0])]
    sums = []
    for arrival in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        s = Recorder(Recorder.Params())
        s.seen = []
        fold = InOrderFold(s, 1, 2)
        for i in arrival:
            fold.offer(i, items[i])
        sums.append(fold.total.total.clone())
        assert s.seen == [10, 11, 12] and fold.total.count == 3
    assert all(torch.equal(sums[0], t) for t in sums[1:])
    fold = InOrderFold(Recorder(Recorder.Params()), 1, 2)
    fold.strategy.seen = []
    fold.offer(1, items[1])
    assert fold.total.count == 0  # waits for position 0
    fold.offer(0, None)  # lost / rejected
    assert fold.total.count == 1 and fold.strategy.seen == [11]
