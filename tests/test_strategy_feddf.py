"""FedDF: ensemble distillation on the server (unit level against a hand computation; 2 rounds on Ray)."""

from __future__ import annotations

import pytest
import torch

from gptfl_ray.config import ConfigError, StrategyConfig, validate_config
from gptfl_ray.fl.flat import FlatModel, VectorLayout
from gptfl_ray.fl.runner import check_fl_config
from gptfl_ray.fl.strategies import PublicData, ServerContext, build_strategy
from gptfl_ray.fl.strategies.feddf import ensemble_probs
from gptfl_ray.models import build_model
from tests.fl_runs import run_and_resume, tiny_config, tiny_raw

SHAPE = (1, 8, 8)


def tiny_model() -> torch.nn.Module:
    return build_model("convnet", 3, SHAPE, width=4)


def vector(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    m = tiny_model()
    return VectorLayout.of(m).to_vector(m.state_dict())


def logits_of(vec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    m = tiny_model()
    FlatModel(m, VectorLayout.of(m)).load(vec)
    with torch.no_grad():
        return m.eval()(x)


def kl(p: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(p ‖ softmax(logits)) by its definition, mean over samples."""
    q = torch.softmax(logits.double(), 1)
    p = p.double()
    return float((p * (p.log() - q.log())).sum(1).mean())


def feddf(x_public: torch.Tensor, **params):
    s = build_strategy(StrategyConfig(name="feddf", **params))
    layout = VectorLayout.of(tiny_model())
    ctx = ServerContext(
        build_model=tiny_model,
        build_client_model=tiny_model,
        server_layout=layout,
        device=torch.device("cpu"),
        seed=0,
        num_classes=3,
        public=PublicData(x_public, "holdout"),
    )
    s.setup(layout, 4, None, ctx)
    return s


def test_ensemble_target_is_the_softmax_of_the_mean_logits():
    x = torch.randn(10, *SHAPE)
    teachers = [vector(s) for s in (1, 2, 3)]
    by_hand = torch.softmax(sum(logits_of(t, x) for t in teachers) / 3 / 2.0, 1)
    got = ensemble_probs(tiny_model, VectorLayout.of(tiny_model()), teachers, x, 2.0, torch.device("cpu"))
    assert torch.allclose(got, by_hand, atol=1e-6)


def test_distillation_lowers_the_kl_to_a_fixed_teacher_ensemble():
    torch.manual_seed(0)
    x = torch.randn(200, *SHAPE)
    teachers = [vector(s) for s in (1, 2, 3)]
    student = vector(9)
    s = feddf(x, steps=60, eval_every=10, patience=1000, batch_size=32, lr=1e-2)
    out = s.distill(student, teachers, rnd=1)
    target = torch.softmax(sum(logits_of(t, x) for t in teachers) / 3, 1)
    before, after = kl(target, logits_of(student, x)), kl(target, logits_of(out, x))
    assert after < 0.5 * before, (before, after)
    assert s.round_info()["val_kl"] < s.round_info()["val_kl_before"]
    # a function of (seed, round): the same call gives the same student, another round another one
    assert torch.equal(out, s.distill(student, teachers, rnd=1))
    assert not torch.equal(out, s.distill(student, teachers, rnd=2))


def test_early_stopping_keeps_the_best_student_on_the_held_out_slice():
    torch.manual_seed(0)
    x = torch.randn(100, *SHAPE)
    teachers = [vector(1)]
    # lr so large the student diverges after its first evaluation: the best (earliest) student is returned
    s = feddf(x, steps=400, eval_every=5, patience=20, lr=5.0)
    out = s.distill(vector(9), teachers, rnd=1)
    info = s.round_info()
    assert info["steps"] < 400  # stopped early
    _, val = s.split_public(len(x))
    target = torch.softmax(logits_of(teachers[0], x[val]), 1)
    assert kl(target, logits_of(out, x[val])) == pytest.approx(info["val_kl"], rel=1e-4)


FEDDF = {"name": "feddf", "steps": 20, "eval_every": 5, "batch_size": 32}
PUBLIC = {"source": "holdout", "num": 120}
CFG = tiny_raw(FEDDF, public_data=PUBLIC)


def cfg(**fl):
    return tiny_config(FEDDF, fl=fl, public_data=PUBLIC)


def test_feddf_runs_on_ray_resumes_bit_identically_and_counts_fedavg_bytes(ray_session, data_dir, tmp_path):
    size = VectorLayout.of(build_model("convnet", 10, (1, 28, 28), width=8)).size
    for rec in run_and_resume(cfg, tmp_path):
        assert rec["num_updates"] == 3
        assert rec["params_down"] == rec["params_up"] == 3 * size  # models down and up, as FedAvg
        assert rec["bytes_up"] == 4 * 3 * size
        info = rec["strategy_info"]
        assert info["val_kl"] <= info["val_kl_before"] and 1 <= info["steps"] <= 20
        assert rec["server_time_s"] > 0


def test_feddf_needs_public_data_and_individual_models():
    with pytest.raises(ConfigError, match=r"^public_data\.source: .*'feddf' needs unlabeled public data"):
        check_fl_config(validate_config({**CFG, "public_data": {"source": "none"}}))
    with pytest.raises(ConfigError, match=r"^fl\.secure_aggregation: not supported .*'feddf'.*use fedavg"):
        check_fl_config(cfg(secure_aggregation=True))
    with pytest.raises(ConfigError, match=r"fl\.strategy\.temperature: Input should be greater than 0"):
        check_fl_config(cfg(strategy={"name": "feddf", "temperature": 0}))
