"""Fed-ET: weighted consensus and diversity targets by hand, the head split on every model, the server step's
head copy, and 2 rounds on Ray with a large server model (exact resume, traffic at the small model's size)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gptfl_ray.fl.strategies.fedet  # noqa: F401  (registers "fedet")
from gptfl_ray.config import ConfigError
from gptfl_ray.fl.flat import VectorLayout
from gptfl_ray.fl.runner import check_fl_config
from gptfl_ray.fl.strategies import ClientResult, PublicData, ServerContext, build_strategy
from gptfl_ray.fl.strategies.fedet import FedET, diversity_kl, weighted_consensus
from gptfl_ray.io import load_weights
from gptfl_ray.models import build_model
from gptfl_ray.models.heads import classifier_head, features_and_logits, head_slices
from tests.fl_runs import run_and_resume, tiny_config


# ------------------------------------------------------------------------ consensus and diversity
def test_weighted_consensus_by_hand():
    # 3 models × 4 samples × 3 classes. Var over classes (unbiased): [3,0,0] → 3, [6,0,0] → 12, [1.5,0,0] → 0.75.
    logits = torch.tensor(
        [
            # sample 0       sample 1      sample 2      sample 3
            [[3, 0, 0], [0, 3, 0], [0, 0, 3], [1, 1, 1]],  # model 0
            [[6, 0, 0], [3, 0, 0], [0, 3, 0], [0, 3, 0]],  # model 1
            [[1.5, 0, 0], [0, 6, 0], [6, 0, 0], [0, 0, 0]],  # model 2
        ]
    )
    labels, targets, mask = weighted_consensus(logits)
    # sample 0: all vote class 0, nobody disagrees.
    # sample 1: σ = (3, 3, 12), α = (1/6, 1/6, 2/3): Σα·z = (0.5, 0.5 + 4, 0) → class 1; model 1 (argmax 0)
    #   disagrees alone: target = its logits.
    # sample 2: σ = (3, 3, 12): Σα·z = (4, 0.5, 0.5) → class 0; models 0 and 1 disagree with equal σ = 3:
    #   target = ([0,0,3] + [0,3,0]) / 2.
    # sample 3: σ = (0, 3, 0): α = (0, 1, 0) → class 1; models 0 and 2 (argmax 0) disagree but have σ = 0:
    #   no weighted diversity target.
    assert labels.tolist() == [0, 1, 0, 1]
    assert mask.tolist() == [False, True, True, False]
    want = torch.tensor([[0, 0, 0], [3, 0, 0], [0, 1.5, 1.5], [0, 0, 0]])
    torch.testing.assert_close(targets, want)

    # Unequal weights among the diverse models: sample 2 with model 1 at σ = 12 and model 2 at [7, 0, 0]
    # (σ = ((14/3)² + 2·(7/3)²) / 2 = 49/3): Σ σ·z = (343/3, 72, 9) → class 0; models 0, 1 disagree.
    logits[1, 2] = torch.tensor([0, 6, 0])
    logits[2, 2] = torch.tensor([7, 0, 0])
    labels, targets, _ = weighted_consensus(logits)
    assert labels[2] == 0
    torch.testing.assert_close(
        targets[2], (3 * torch.tensor([0, 0, 3.0]) + 12 * torch.tensor([0, 6, 0.0])) / 15
    )

    # Every model constant (Σσ = 0): uniform α; mean logits (1, 1, 1) → class 0; nobody disagrees.
    flat_logits = torch.tensor([[[1.0, 1, 1]], [[2.0, 2, 2]], [[0.0, 0, 0]]])
    labels, targets, mask = weighted_consensus(flat_logits)
    assert labels.tolist() == [0] and mask.tolist() == [False] and targets.abs().sum() == 0


def test_diversity_kl_by_hand():
    server = torch.zeros(4, 3)  # uniform server predictions
    targets = torch.tensor([[0, 0, 0], [3, 0, 0], [0, 1.5, 1.5], [0, 0, 0]])
    mask = torch.tensor([False, True, True, False])

    def kl_to_uniform(z):
        e = [math.exp(v) for v in z]
        q = [v / sum(e) for v in e]
        return sum(qi * math.log(qi * 3) for qi in q)

    want = (kl_to_uniform([3, 0, 0]) + kl_to_uniform([0, 1.5, 1.5])) / 4  # masked sum / batch size
    assert float(diversity_kl(server, targets, mask)) == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------------------------ heads
SHAPES = {
    "convnet": (1, 28, 28),
    "cnn": (1, 28, 28),
    "audio_cnn": (1, 40, 101),
    "resnet18": (3, 32, 32),
    "resnet50": (3, 32, 32),
    "vgg19": (3, 32, 32),
}
HEAD_NAMES = {
    "convnet": "classifier",
    "cnn": "classifier.2",
    "audio_cnn": "classifier.1",
    "resnet18": "fc",
    "resnet50": "fc",
    "vgg19": "classifier",
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_heads_on_every_registry_model(name):
    torch.manual_seed(0)
    model = build_model(name, 7, SHAPES[name])
    head_name, head = classifier_head(model)
    assert head_name == HEAD_NAMES[name] and head.out_features == 7
    layout = VectorLayout.of(model)
    vec = layout.to_vector(model.state_dict())
    w, b = head_slices(model, layout)
    assert torch.equal(vec[w], head.weight.detach().reshape(-1))
    assert torch.equal(vec[b], head.bias.detach().reshape(-1))
    # Nothing else in the vector: exactly the head's elements, and the slices cover them once.
    assert (w.stop - w.start, b.stop - b.start) == (head.weight.numel(), head.bias.numel())
    marked = torch.zeros(layout.size, dtype=torch.bool)
    marked[w] = marked[b] = True
    assert int(marked.sum()) == head.weight.numel() + head.bias.numel()

    model.eval()
    x = torch.randn(2, *SHAPES[name])
    with torch.no_grad():
        feats, logits = features_and_logits(model, x)
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(feats @ head.weight.T + head.bias, logits)  # head(features) = logits
    assert feats.shape == (2, head.in_features)


def test_heads_errors():
    with pytest.raises(ValueError, match="Sequential: no nn.Linear"):
        classifier_head(nn.Sequential(nn.Conv2d(1, 2, 3)))
    scaled = nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.Softmax(dim=1))
    with pytest.raises(ValueError, match="not the last nn.Linear's output"):
        features_and_logits(scaled, torch.randn(1, 4))
    other = build_model("cnn", 10, (1, 28, 28))
    with pytest.raises(ValueError, match="not in the vector layout"):
        head_slices(other, VectorLayout.of(build_model("convnet", 10, (1, 28, 28), width=8)))


# ------------------------------------------------------------------------------ server step alone
def make_fedet(server_name, client_name, client_width=None, **params):
    shape, n = (1, 28, 28), 10
    torch.manual_seed(0)
    client_init = build_model(client_name, n, shape, width=client_width)
    ctx = ServerContext(
        build_model=lambda: build_model(server_name, n, shape),
        build_client_model=lambda: build_model(client_name, n, shape, width=client_width),
        server_layout=VectorLayout.of(build_model(server_name, n, shape)),
        device=torch.device("cpu"),
        seed=0,
        num_classes=n,
        public=PublicData(torch.randn(40, *shape), "holdout"),
        init_client_weights=VectorLayout.of(client_init).to_vector(client_init.state_dict()),
    )
    strategy = FedET(FedET.Params(**params))
    layout = VectorLayout.of(client_init)
    strategy.setup(layout, 4, None, ctx)
    return strategy, ctx, layout


def client_round(strategy, rnd, k=3):
    start = strategy.client_weights(None)
    models = [
        start + 0.01 * torch.randn(start.shape, generator=torch.Generator().manual_seed(i)) for i in range(k)
    ]
    for i, m in enumerate(models):
        strategy.client_result(ClientResult(i, rnd, i, m, {}, 10))
    return start, models, torch.stack(models).mean(0) - start


def test_server_step_copies_heads_when_shapes_match():
    # audio_cnn (server, 241k) and cnn (client, 225k) both end in Linear(128 → 10).
    strategy, ctx, layout = make_fedet("audio_cnn", "cnn", steps=0)
    server_model = ctx.build_model()
    s_w, s_b = head_slices(server_model, ctx.server_layout)
    c_w, c_b = head_slices(ctx.build_client_model(), layout)
    x = ctx.server_layout.to_vector(server_model.state_dict())
    start, models, mean_delta = client_round(strategy, 1)
    new_x = strategy.server_update(x, mean_delta)
    # step B with no training: the server head is the clients' mean head, the rest is unchanged
    for s, c in ((s_w, c_w), (s_b, c_b)):
        torch.testing.assert_close(new_x[s], torch.stack([m[c] for m in models]).mean(0))
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[s_w] = keep[s_b] = False
    assert torch.equal(new_x[keep], x[keep])
    # step D: the small model is the clients' average with the server's head
    small = strategy.client_weights(None)
    ckeep = torch.ones(len(start), dtype=torch.bool)
    ckeep[c_w] = ckeep[c_b] = False
    assert torch.equal(small[ckeep], (start + mean_delta)[ckeep])
    assert torch.equal(small[c_w], new_x[s_w]) and torch.equal(small[c_b], new_x[s_b])
    assert strategy.round_info()["head_transfer"] == "copy"

    # With training (2 steps), the trained server head still goes back to the clients.
    strategy.end_round(True)
    strategy.params = FedET.Params(steps=2)
    _, _, mean_delta = client_round(strategy, 2)
    x2 = strategy.server_update(new_x, mean_delta)
    assert not torch.equal(x2[keep], new_x[keep])  # the server model trained
    small = strategy.client_weights(None)
    assert torch.equal(small[c_w], x2[s_w]) and torch.equal(small[c_b], x2[s_b])
    assert strategy.round_info()["steps"] == 2


def test_small_model_without_client_model_starts_from_the_server_model():
    strategy, ctx, layout = make_fedet("cnn", "cnn")
    ctx.init_client_weights = None  # no fl.client_model: clients train the server's architecture
    strategy.setup(layout, 4, None, ctx)
    x = torch.randn(layout.size)
    assert torch.equal(strategy.client_weights(x), x)
    assert torch.equal(strategy.client_weights(x + 1), x)  # kept from then on
    tensors, _ = strategy.state_dict()
    other, _, _ = make_fedet("cnn", "cnn")
    other.load_state_dict(tensors, {})
    assert torch.equal(other.client_weights(None), x)


# ------------------------------------------------------------------------------------ end to end
def fedet_cfg(rounds: int = 2, **fl):
    """A cnn server model distilled from convnet (width 8) clients."""
    fl = {"client_model": {"name": "convnet", "width": 8}, "rounds": rounds, **fl}
    return tiny_config(
        {"name": "fedet", "steps": 4},
        fl=fl,
        model={"name": "cnn"},
        public_data={"source": "holdout", "num": 200},
    )


def test_two_rounds_on_ray_resume_and_traffic(ray_session, data_dir, tmp_path):
    recs = run_and_resume(fedet_cfg, tmp_path)  # full/ and part/ + resume: the same final weights
    wa = load_weights(tmp_path / "full" / "final.safetensors")
    server_keys = set(build_model("cnn", 10, (1, 28, 28)).state_dict())
    assert set(wa) == server_keys  # the evaluated (and saved) model is the server's cnn

    # convnet width 8 on 28×28: 3 × [conv3×3 + GroupNorm(affine)] then Linear(8·3·3 → 10)
    small = (1 * 8 * 9 + 8) + 2 * 8 + 2 * ((8 * 8 * 9 + 8) + 2 * 8) + (72 * 10 + 10)
    assert small == 2026 == VectorLayout.of(build_model("convnet", 10, (1, 28, 28), width=8)).size
    assert [r["round"] for r in recs] == [1, 2]
    for r in recs:
        assert r["params_down"] == r["params_up"] == 3 * small
        assert r["bytes_down"] == r["bytes_up"] == 4 * 3 * small
        info = r["strategy_info"]
        assert info["steps"] == 4 and info["head_transfer"] == "distill"  # cnn head 128→10, convnet 72→10
        assert 0 <= info["disagreement_rate"] <= 1 and 0 <= info["diverse_samples"] <= 1
        assert 0 <= r["accuracy"] <= 1


# ------------------------------------------------------------------------------------ refusals
def test_refusals():
    with pytest.raises(ConfigError) as err:
        check_fl_config(fedet_cfg(1, secure_aggregation=True))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("fl.secure_aggregation:") and "'fedet'" in msg

    with pytest.raises(ConfigError, match=r"^fl\.client_model: fl\.strategy\.name='fedavg'"):
        check_fl_config(fedet_cfg(1, strategy={"name": "fedavg"}))
    assert isinstance(build_strategy(fedet_cfg(1).fl.strategy), FedET)
