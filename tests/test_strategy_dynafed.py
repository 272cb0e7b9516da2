"""DynaFed: trajectory matching and the server fine-tune against hand computations; 2 rounds on Ray."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gptfl_ray.fl.strategies.dynafed  # noqa: F401  (registers "dynafed")
from gptfl_ray.config import ConfigError, StrategyConfig
from gptfl_ray.fl.flat import FlatModel, VectorLayout
from gptfl_ray.fl.runner import check_fl_config
from gptfl_ray.fl.strategies import ServerContext, build_strategy
from gptfl_ray.fl.strategies.dynafed import (
    DynaFed,
    DynaFedParams,
    kd_loss,
    match_loss,
    sample_segment,
    synthesize,
)
from gptfl_ray.models import build_model
from tests.fl_runs import run_and_resume, tiny_config

SHAPE, C = (1, 4, 4), 3
D = 16  # flattened input size


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def linear() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(D, C))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))


def strategy(build=linear, **params) -> DynaFed:
    s = build_strategy(StrategyConfig(name="dynafed", **params))
    layout = VectorLayout.of(build())
    ctx = ServerContext(
        build_model=build,
        build_client_model=build,
        server_layout=layout,
        device=torch.device("cpu"),
        seed=0,
        num_classes=C,
        input_shape=SHAPE,
    )
    s.setup(layout, 4, None, ctx)
    return s


def linear_grad(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇_θ kd_loss(Wx + b, y) by hand: dz = (softmax(z) − softmax(y)) / (B·C); ∇W = dzᵀX, ∇b = Σ dz."""
    w, b = theta[: C * D].view(C, D), theta[C * D :]
    xf = x.reshape(len(x), -1)
    dz = (torch.softmax(xf @ w.T + b, 1) - torch.softmax(y, 1)) / (len(x) * C)
    return torch.cat([(dz.T @ xf).reshape(-1), dz.sum(0)])


def test_kd_loss_is_the_soft_cross_entropy_over_classes():
    z, y = torch.randn(5, C), torch.randn(5, C)
    by_hand = -(torch.softmax(y, 1) * torch.log_softmax(z, 1)).sum(1).mean() / C
    assert float(kd_loss(z, y)) == pytest.approx(float(by_hand), rel=1e-6)


def test_segments_follow_the_reference_draws():
    p = DynaFedParams()  # L = 25, E = 3, max_start 50, k in {2, 3}
    gen = torch.Generator().manual_seed(0)
    starts, ks = set(), set()
    for _ in range(2000):
        s, idx = sample_segment(25, p, gen)
        assert 0 <= s <= 21 and all(s + 1 <= i <= s + 3 for i in idx)
        starts.add(s)
        ks.add(len(idx))
    assert starts == set(range(22)) and ks == {2, 3}
    p1 = DynaFedParams(weight_averaging=False, max_start=2)
    for _ in range(100):
        s, idx = sample_segment(25, p1, gen)
        assert idx == [s + 3] and s <= 2
    assert sample_segment(4, p, gen)[0] == 0  # min(max_start, L-1-E) = 0: start fixed at 0


def test_matching_objective_equals_one_sgd_step_by_hand():
    torch.manual_seed(0)
    net = linear()
    layout = VectorLayout.of(net)
    n = layout.num_trainable
    start, target = torch.randn(n), torch.randn(n)
    images = torch.randn(6, *SHAPE, requires_grad=True)
    labels = torch.randn(6, C, requires_grad=True)
    lr = torch.tensor(0.3, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    loss = match_loss(net, layout, start, target, images, labels, lr, 1, 6, gen)
    g = linear_grad(start, images.detach(), labels.detach())
    after = start - 0.3 * g
    dist = (start - target).pow(2).sum()
    by_hand = (after - target).pow(2).sum() / dist
    assert float(loss.detach()) == pytest.approx(float(by_hand), rel=1e-5)
    loss.backward()  # dℒ/dα = 2·(θ₁ − θ*)·(−g) / ‖θ₀ − θ*‖²
    assert float(lr.grad) == pytest.approx(float(-2 * ((after - target) * g).sum() / dist), rel=1e-4)
    assert images.grad is not None and labels.grad is not None and images.grad.abs().sum() > 0


def fake_trajectory(net: nn.Module, checkpoints: int) -> torch.Tensor:
    """Real SGD on random labelled data: the trainable vector every 3 steps."""
    flat = FlatModel(net, VectorLayout.of(net))
    x, y = torch.randn(60, *SHAPE), torch.randint(0, C, (60,))
    opt = torch.optim.SGD([flat.param], lr=0.5)
    out = [flat.param.data.clone()]
    while len(out) < checkpoints:
        for _ in range(3):
            flat.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        out.append(flat.param.data.clone())
    return torch.stack(out)


def test_matching_lowers_its_loss_and_gives_the_configured_set():
    torch.manual_seed(0)
    traj = fake_trajectory(mlp(), 6)
    layout = VectorLayout.of(mlp())
    common = dict(trajectory_length=6, ipc=2, syn_steps=4, expert_epochs=2, lr_img=0.3, lr_label=0.3)
    # a fixed segment (start 0, target θ_2): the objective is deterministic up to the inner permutations
    p = DynaFedParams(iterations=25, weight_averaging=False, max_start=0, **common)
    syn = synthesize(mlp(), layout, traj, C, SHAPE, p, torch.Generator().manual_seed(0))
    first, last = sum(syn.losses[:5]) / 5, sum(syn.losses[-5:]) / 5
    assert last < 0.75 * first, (first, last)
    assert all(b < a for a, b in zip(syn.losses, syn.losses[1:], strict=False))  # full batch: monotone here
    assert syn.images.shape == (C * 2, *SHAPE) and syn.labels.shape == (C * 2, C) and syn.lr.shape == ()
    assert not syn.images.requires_grad and float(syn.lr) != 0.04  # α was learned
    # the reference's random segments and averaged targets: lower on average
    p = DynaFedParams(iterations=25, min_average=1, **common)
    syn = synthesize(mlp(), layout, traj, C, SHAPE, p, torch.Generator().manual_seed(0))
    assert sum(syn.losses[-5:]) < 0.9 * sum(syn.losses[:5]), syn.losses


def adam_by_hand(theta: torch.Tensor, grads, lr: float) -> torch.Tensor:
    """torch.optim.Adam's defaults (β = 0.9, 0.999, ε = 1e-8) written out, from a fresh state."""
    m = v = torch.zeros_like(theta)
    for t, grad_fn in enumerate(grads, start=1):
        g = grad_fn(theta)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        theta = theta - lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
    return theta


def test_server_rounds_record_synthesise_once_then_finetune_by_hand():
    s = strategy(trajectory_length=3, expert_epochs=1, min_average=1, ipc=2, iterations=3, syn_steps=2,
                 distill_iter=2, distill_lr=0.01)  # fmt: skip
    n = s.server.server_layout.num_trainable
    torch.manual_seed(0)
    x0 = torch.randn(n)
    deltas = [0.1 * torch.randn(n) for _ in range(3)]
    s.begin_round(1)
    x1 = s.server_update(x0, deltas[0])
    assert torch.equal(x1, x0 + deltas[0]) and s.round_info() == {"trajectory_checkpoints": 2}
    s.begin_round(2)
    x2 = s.server_update(x1, deltas[1])  # the trajectory reaches 3: synthesis, the average is returned as is
    assert torch.equal(x2, x1 + deltas[1]) and s.trajectory == []
    info = s.round_info()
    assert info["match_iterations"] == 3 and info["match_s"] > 0 and s.synthesized_round == 2
    assert set(info) >= {"match_loss_start", "match_loss_end", "syn_lr"}
    s.begin_round(3)
    avg = x2 + deltas[2]
    x3 = s.server_update(x2, deltas[2])
    images, labels = s.synthetic.images, s.synthetic.labels  # 6 images < batch 256: one step per epoch
    by_hand = adam_by_hand(avg, [lambda t: linear_grad(t, images, labels)] * 2, lr=0.01)
    assert torch.allclose(x3, by_hand, atol=1e-6)
    info = s.round_info()
    assert info["finetune_steps"] == 2 and info["finetune_loss"] < info["finetune_loss_before"]
    # every round starts a fresh Adam: round 4 is again two fresh-Adam steps from its own average
    s.begin_round(4)
    x4 = s.server_update(x3, deltas[0])
    assert torch.allclose(x4, adam_by_hand(x3 + deltas[0], [lambda t: linear_grad(t, images, labels)] * 2, 0.01),
                          atol=1e-6)  # fmt: skip


def test_state_dict_resumes_the_trajectory_and_the_synthetic_set_bit_identically():
    params = dict(trajectory_length=3, expert_epochs=1, min_average=1, ipc=2, iterations=3, syn_steps=2)
    torch.manual_seed(0)
    n = VectorLayout.of(mlp()).num_trainable
    x0, deltas = torch.randn(n), [0.1 * torch.randn(n) for _ in range(4)]

    def run(s: DynaFed, x: torch.Tensor, rounds: range) -> torch.Tensor:
        for r in rounds:
            s.begin_round(r)
            x = s.server_update(x, deltas[r - 1])
        return x

    full = run(strategy(mlp, **params), x0, range(1, 5))
    for stop in (1, 2):  # checkpoint holding the trajectory (1) or the synthetic set (2)
        a = strategy(mlp, **params)
        x = run(a, x0, range(1, stop + 1))
        tensors, meta = a.state_dict()
        assert set(tensors) == ({"trajectory"} if stop == 1 else {"images", "labels", "syn_lr"})
        b = strategy(mlp, **params)
        b.load_state_dict(tensors, meta)
        assert torch.equal(run(b, x, range(stop + 1, 5)), full)


DYNAFED = {
    "name": "dynafed",
    "trajectory_length": 2,  # θ_0, θ_1: synthesis in round 1, fine-tune in round 2
    "expert_epochs": 1,
    "min_average": 1,
    "ipc": 1,
    "iterations": 3,
    "syn_steps": 2,
    "distill_iter": 2,
}


def cfg(**fl):
    return tiny_config(DYNAFED, fl=fl)


def test_dynafed_runs_on_ray_resumes_bit_identically_and_counts_fedavg_bytes(ray_session, data_dir, tmp_path):
    recs = run_and_resume(cfg, tmp_path)  # the same final weights, accuracies and strategy_info on resume
    size = VectorLayout.of(build_model("convnet", 10, (1, 28, 28), width=8)).size
    for rec in recs:
        assert rec["num_updates"] == 3
        assert rec["params_down"] == rec["params_up"] == 3 * size  # models down and up, as FedAvg
        assert rec["bytes_up"] == 4 * 3 * size
        assert rec["server_time_s"] > 0
    assert (
        recs[0]["strategy_info"]["match_iterations"] == 3 and "finetune_steps" not in recs[0]["strategy_info"]
    )
    assert recs[1]["strategy_info"]["finetune_steps"] == 2  # 10 images, batch 256: one step per epoch


def test_dynafed_is_accepted_under_secure_aggregation_and_validates_its_params():
    s = check_fl_config(cfg(secure_aggregation=True))
    assert isinstance(s, DynaFed) and not DynaFed.needs_individual_results()
    assert s.params.weighted is False
    with pytest.raises(ConfigError, match=r"fl\.strategy.*trajectory_length \(3\) must exceed expert_epochs"):
        check_fl_config(cfg(strategy={"name": "dynafed", "trajectory_length": 3}))
    with pytest.raises(ConfigError, match=r"fl\.strategy.*min_average \(2\) exceeds"):
        check_fl_config(cfg(strategy={"name": "dynafed", "trajectory_length": 3, "expert_epochs": 1}))


def test_refused_for_text_inputs():
    from gptfl_ray.config import ConfigError, validate_config
    from gptfl_ray.fl.runner import check_fl_config

    cfg = validate_config({"data": {"dataset": "meld"}, "fl": {"strategy": {"name": "dynafed"}}})
    with pytest.raises(ConfigError, match="fl.strategy.name: 'dynafed' learns synthetic inputs by gradient"):
        check_fl_config(cfg)
