"""FedGen: label-count weights and the generator's loss by hand (numpy), G training lowers it on fixed heads,
the client regulariser by hand, server state round trip; 2 rounds on Ray with exact bytes and a
bit-identical resume; refused under secure aggregation."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import gptfl_ray.fl.strategies.fedgen  # noqa: F401  (registers "fedgen")
from gptfl_ray.config import ConfigError, StrategyConfig
from gptfl_ray.fl.flat import FlatModel, VectorLayout
from gptfl_ray.fl.runner import check_fl_config
from gptfl_ray.fl.strategies import ClientContext, ClientResult, ServerContext, build_strategy
from gptfl_ray.fl.strategies.fedgen import label_weights, teacher_loss
from gptfl_ray.models import build_model
from tests.fl_runs import run_and_resume, tiny_config

IN, FEAT, C, HID, NOISE = 4, 3, 3, 8, 4
SMALL = {"generator_hidden_dim": HID, "noise_dim": NOISE}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny() -> nn.Module:
    """Flatten → Linear(IN→FEAT) → ReLU → head Linear(FEAT→C)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(IN, FEAT), nn.ReLU(), nn.Linear(FEAT, C))


LAYOUT = VectorLayout.of(tiny())
HEAD_AT = IN * FEAT + FEAT  # the head's weight (C×FEAT) then bias (C) end the vector


def server(**params):
    s = build_strategy(StrategyConfig(name="fedgen", **{**SMALL, **params}))
    ctx = ServerContext(
        build_model=tiny,
        build_client_model=tiny,
        server_layout=LAYOUT,
        device=torch.device("cpu"),
        seed=0,
        num_classes=C,
    )
    s.setup(LAYOUT, 6, None, ctx)
    return s


def with_head(w: np.ndarray, b: np.ndarray) -> torch.Tensor:
    vec = LAYOUT.to_vector(tiny().state_dict())
    vec[HEAD_AT:] = torch.tensor(np.concatenate([w.ravel(), b]), dtype=torch.float32)
    return vec


RNG = np.random.default_rng(3)
HEADS = [(RNG.normal(size=(C, FEAT)), RNG.normal(size=C)) for _ in range(3)]
COUNTS = np.array([[5.0, 0, 1], [0, 4, 2], [1, 0, 0]])  # label 1 only at client 1


def run_round(s, rnd: int, heads=HEADS, counts=COUNTS) -> None:
    s.begin_round(rnd)
    x = LAYOUT.to_vector(tiny().state_dict())
    for slot, ((w, b), c) in enumerate(zip(heads, counts, strict=True)):
        up = {"label_counts": torch.tensor(c, dtype=torch.float32)}
        s.client_result(ClientResult(slot, rnd, slot, with_head(w, b), up, 10))
    s.server_update(x, torch.zeros_like(x))
    s.end_round(True)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def hand_teacher_loss(features: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
    """Σ_k mean_i w_k(y_i)·CE(h_k(features_i), y_i) with the hand-made heads."""
    total = 0.0
    for k, (w, b) in enumerate(HEADS):
        ce = -np_log_softmax(features @ w.T + b)[np.arange(len(y)), y]
        total += float((weights[k, y] * ce).mean())
    return total


# ------------------------------------------------------------------------------------ server half
def test_label_count_weights_by_hand():
    w0, labels = label_weights(torch.tensor(COUNTS), prior=0.0)
    np.testing.assert_allclose(w0.numpy(), [[5 / 6, 0, 1 / 3], [0, 1, 2 / 3], [1 / 6, 0, 0]])
    assert labels.tolist() == [0, 1, 2]
    w1, _ = label_weights(torch.tensor(COUNTS), prior=1.0)  # the reference's start value 1
    np.testing.assert_allclose(
        w1.numpy(), [[6 / 9, 1 / 7, 2 / 6], [1 / 9, 5 / 7, 3 / 6], [2 / 9, 1 / 7, 1 / 6]]
    )
    # a label nobody saw: not trained for; with prior 0 its weights are 0 (not NaN)
    w, labels = label_weights(torch.tensor([[2.0, 0, 1], [1, 0, 0]]), prior=0.0)
    assert labels.tolist() == [0, 2] and w[:, 1].tolist() == [0.0, 0.0]


def test_teacher_loss_is_the_count_weighted_ensemble_cross_entropy():
    feats = RNG.normal(size=(7, FEAT))
    y = np.array([0, 1, 2, 2, 0, 1, 0])
    w, _ = label_weights(torch.tensor(COUNTS), prior=1.0)
    heads = [(torch.tensor(a), torch.tensor(b)) for a, b in HEADS]
    got = teacher_loss(torch.tensor(feats), torch.tensor(y), heads, w)
    assert float(got) == pytest.approx(hand_teacher_loss(feats, y, w.numpy()), rel=1e-12)


def test_generator_training_lowers_the_ensemble_loss_on_fixed_heads():
    s = server(generator_steps=100, generator_lr=1e-2, ensemble_eta=0.0)
    assert s.broadcast() == {} and s.upload_sizes() == {"label_counts": C}
    gen0 = copy.deepcopy(s.gen)
    g = torch.Generator().manual_seed(11)
    z, y = torch.rand(64, NOISE, generator=g), torch.randint(C, (64,), generator=g)
    w = label_weights(torch.tensor(COUNTS), 1.0)[0].numpy()

    def loss_of(gen) -> float:
        with torch.no_grad():  # train mode (batch statistics) as in training, on a copy
            return hand_teacher_loss(copy.deepcopy(gen).train()(z, y).double().numpy(), y.numpy(), w)

    run_round(s, 1)
    before, after = loss_of(gen0), loss_of(s.gen)
    assert after < 0.8 * before, (before, after)
    info = s.round_info()
    assert info["generator_steps"] == 100 and info["teacher_loss_last"] < info["teacher_loss_first"]
    assert info["generator_lr"] == 1e-2 and s.opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.98)
    # a function of (seed, round): the same round from the same start gives the same G
    again = server(generator_steps=100, generator_lr=1e-2, ensemble_eta=0.0)
    run_round(again, 1)
    assert same_state(s.gen, again.gen)


def test_broadcast_mask_schedule_and_state_round_trip():
    s = server(generator_steps=3, generative_alpha=2.0, generative_beta=3.0)
    counts = COUNTS.copy()
    counts[:, 1] = 0  # nobody saw label 1: G is not trained for it
    run_round(s, 1, counts=counts)
    s.begin_round(2)
    b = s.broadcast()
    assert b["labels"].tolist() == [1.0, 0.0, 1.0]
    np.testing.assert_allclose(b["coef"].numpy(), [2 * 0.98, 3 * 0.98], rtol=1e-6)
    g_size = (NOISE + C) * HID + HID + 2 * HID + HID * FEAT + FEAT + 2 * HID  # params + BN running stats
    assert b["generator"].shape == (g_size,)
    s.end_round(True)
    s.begin_round(1000)
    assert s.broadcast()["coef"].tolist() == pytest.approx([1e-4, 1e-4])  # floor of the decay

    tensors, meta = s.state_dict()
    meta = json.loads(json.dumps(meta))
    resumed = server(generator_steps=3, generative_alpha=2.0, generative_beta=3.0)
    resumed.load_state_dict(tensors, meta)
    for t in (s, resumed):
        run_round(t, 2)
    assert same_state(s.gen, resumed.gen)
    assert s.opt.param_groups[0]["lr"] == resumed.opt.param_groups[0]["lr"]


# ------------------------------------------------------------------------------------ client half
def np_generator(vec: np.ndarray, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """G in eval mode by hand from its flat vector [fc.w, fc.b, bn.γ, bn.β, out.w, out.b | bn.mean, bn.var]."""
    sizes = [(HID, NOISE + C), (HID,), (HID,), (HID,), (FEAT, HID), (FEAT,), (HID,), (HID,)]
    parts, off = [], 0
    for shape in sizes:
        n = int(np.prod(shape))
        parts.append(vec[off : off + n].reshape(shape))
        off += n
    w1, b1, gamma, beta, w2, b2, mean, var = parts
    h = np.concatenate([z, np.eye(C)[y]], 1) @ w1.T + b1
    h = np.maximum((h - mean) / np.sqrt(var + 1e-5) * gamma + beta, 0)
    return h @ w2.T + b2


def test_client_regulariser_by_hand():
    s = server(generator_steps=5, generative_alpha=2.0, generative_beta=3.0, gen_batch_size=6)
    counts = COUNTS.copy()
    counts[:, 1] = 0
    run_round(s, 1, counts=counts)  # G trained for labels {0, 2}
    s.begin_round(2)
    b = s.broadcast()

    client = build_strategy(StrategyConfig(name="fedgen", **SMALL, gen_batch_size=6))
    net = tiny()
    flat = FlatModel(net, LAYOUT)
    ctx = ClientContext(
        global_params=flat.param.data.clone(),
        lr=0.1,
        broadcast=b,
        flat=flat,
        batch_size=4,
        generator=torch.Generator().manual_seed(5),
    )
    client.client_begin(ctx)
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 0, 2, 1])
    logits = net(x)
    got = client.local_loss(ctx, x, y, logits)
    assert got is not None

    g = torch.Generator().manual_seed(5)  # the draws, in the client's order
    z = torch.rand(4, NOISE, generator=g).double().numpy()
    y_s = np.array([0, 2])[torch.randint(2, (6,), generator=g).numpy()]
    z_s = torch.rand(6, NOISE, generator=g).double().numpy()
    vec = b["generator"].double().numpy()
    hw, hb = net[3].weight.detach().double().numpy(), net[3].bias.detach().double().numpy()
    alpha, beta = 2 * 0.98, 3 * 0.98
    ce = -np_log_softmax(np_generator(vec, z_s, y_s) @ hw.T + hb)[np.arange(6), y_s].mean()
    target = np.exp(np_log_softmax(np_generator(vec, z, y.numpy()) @ hw.T + hb))
    kl = (target * (np.log(target) - np_log_softmax(logits.detach().double().numpy()))).sum(1).mean()
    assert float(got.detach()) == pytest.approx((6 / 4) * alpha * ce + beta * kl, rel=1e-5)

    got.backward()  # the regulariser trains the client's model; G is frozen
    assert flat.param.grad.abs().sum() > 0
    assert client.client_end(ctx, flat.param.data, 1)["label_counts"].tolist() == [1.0, 2.0, 1.0]


def test_client_without_generator_only_counts_labels():
    client = build_strategy(StrategyConfig(name="fedgen", **SMALL))
    net = tiny()
    ctx = ClientContext(global_params=torch.zeros(1), lr=0.1, flat=FlatModel(net, LAYOUT))
    client.client_begin(ctx)
    for y in ([0, 0, 2], [2, 2]):
        x = torch.randn(len(y), IN)
        assert client.local_loss(ctx, x, torch.tensor(y), net(x)) is None
    assert client.client_end(ctx, ctx.flat.param.data, 2)["label_counts"].tolist() == [2.0, 0.0, 3.0]


# ------------------------------------------------------------------------------------ on Ray
def cfg(**fl):
    return tiny_config({"name": "fedgen", "generator_steps": 5}, fl=fl)


def test_fedgen_runs_on_ray_resumes_bit_identically_and_counts_bytes(ray_session, data_dir, tmp_path):
    recs = run_and_resume(cfg, tmp_path)  # the same final weights, accuracies and strategy_info on resume
    size = VectorLayout.of(build_model("convnet", 10, (1, 28, 28), width=8)).size
    feat, hid, noise = 72, 256, 32  # convnet width 8 on 28×28: 8·3·3 features; the reference G sizes
    g_size = (noise + 10) * hid + hid + 2 * hid + hid * feat + feat + 2 * hid
    assert [r["params_down"] for r in recs] == [3 * size, 3 * (size + g_size + 10 + 2)]  # G, mask, (α_t, β_t)
    for rec in recs:
        assert rec["num_updates"] == 3
        assert rec["params_up"] == 3 * (size + 10) and rec["bytes_up"] == 4 * rec["params_up"]
        info = rec["strategy_info"]
        assert info["generator_steps"] == 5 and np.isfinite(info["teacher_loss_mean"])


def test_fedgen_is_refused_under_secure_aggregation():
    with pytest.raises(ConfigError, match=r"^fl\.secure_aggregation: not supported .*'fedgen'.*use fedavg"):
        check_fl_config(cfg(secure_aggregation=True))
    with pytest.raises(
        ConfigError, match=r"fl\.strategy\.generator_batch_size: Input should be greater than 1"
    ):
        check_fl_config(cfg(strategy={"name": "fedgen", "generator_batch_size": 1}))
