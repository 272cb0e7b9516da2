"""The algorithm API: local-loss hook, extra uploads counted, `module:Class` strategies in the actors, public data."""

from __future__ import annotations

import hashlib
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gptfl_ray.config import ConfigError, StrategyConfig, validate_config
from gptfl_ray.fl.client import local_train
from gptfl_ray.fl.data import prepare_federated_data
from gptfl_ray.fl.flat import FlatModel, VectorLayout
from gptfl_ray.fl.runner import run_federated
from gptfl_ray.fl.strategies import ClientContext, FedAvg, build_strategy
from gptfl_ray.io import read_jsonl
from gptfl_ray.models import build_model


class L2Logits(FedAvg):
    def local_loss(self, ctx, inputs, labels, logits):
        return 0.3 * (logits**2).mean()


def test_local_loss_is_added_to_every_local_step():
    """One SGD step through local_train == one step on CE + 0.3·mean(logits²) differentiated by autograd."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    ref = nn.Linear(3, 2)
    model = nn.Linear(3, 2)
    model.load_state_dict(ref.state_dict())
    loss = F.cross_entropy(ref(x), y) + 0.3 * (ref(x) ** 2).mean()
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    expected = [p.detach() - 0.1 * g for p, g in zip(ref.parameters(), grads, strict=True)]

    flat = FlatModel(model, VectorLayout.of(model))
    opt = torch.optim.SGD([flat.param], lr=0.1)
    ctx = ClientContext(global_params=flat.param.detach().clone(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    local_train(flat, opt, L2Logits(L2Logits.Params()), ctx, x, y, epochs=1, batch_size=8, generator=gen)
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(p, e, atol=1e-6)


PLUGIN = '''
import torch
from pydantic import Field
from gptfl_ray.fl.strategies import FedAvg


class ProbeParams(FedAvg.Params):
    tag: float = Field(7.0)


class Probe(FedAvg):
    """FedAvg whose clients also upload [tag, local steps, broadcast entries]; the server records them."""

    name = "probe"
    Params = ProbeParams

    def setup(self, layout, num_clients, state_dir, server=None):
        super().setup(layout, num_clients, state_dir, server)
        self.seen = []

    def broadcast(self):
        return {"hello": torch.ones(5)}

    def upload_sizes(self):
        return {"probe": 3}

    def client_end(self, ctx, params, steps):
        return {"probe": torch.tensor([self.params.tag, float(steps), float(ctx.broadcast["hello"].sum())])}

    def accept(self, cid, rnd, uploads):
        self.seen.append(uploads["probe"].tolist())

    def round_info(self):
        out, self.seen = {"seen": self.seen}, []
        return out
'''


def test_module_class_strategy_runs_in_the_actors_and_its_uploads_are_counted(
    ray_session, data_dir, tmp_path
):
    """A strategy in a module the actors cannot import (it lives in a test folder) still runs there."""
    name = "plugin_probe_" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:8]
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN))
    sys.path.insert(0, str(tmp_path))
    try:
        cfg = validate_config(
            {
                "data": {"dataset": "mnist", "test_split": "holdout", "num_test": 100, "num_train": 300},
                "partition": {"method": "iid", "num_clients": 3},
                "model": {"name": "convnet", "width": 4},
                "fl": {
                    "strategy": {"name": f"{name}:Probe", "tag": 3.5},
                    "rounds": 1,
                    "clients_per_round": 3,
                    "num_actors": 1,
                    "local": {"batch_size": 50},
                },
            }
        )
        run_federated(cfg, seed=0, out_dir=tmp_path / "run")
    finally:
        sys.path.remove(str(tmp_path))
    (rec,) = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert rec["strategy_info"]["seen"] == [[3.5, 2.0, 5.0]] * 3  # 100 samples / 50 per step; tag from params
    size = VectorLayout.of(build_model("convnet", 10, (1, 28, 28), width=4)).size
    assert rec["params_up"] == 3 * (size + 3) and rec["bytes_up"] == 4 * 3 * (size + 3)
    assert rec["params_down"] == 3 * (size + 5) and rec["bytes_down"] == 4 * 3 * (size + 5)


def test_strategy_names_that_do_not_resolve_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^fl\.strategy\.name: cannot import 'no_such_module_x'"):
        build_strategy(StrategyConfig(name="no_such_module_x:Thing"))
    with pytest.raises(
        ConfigError, match=r"^fl\.strategy\.name: 'gptfl_ray\.io:read_json' is not a Strategy"
    ):
        build_strategy(StrategyConfig(name="gptfl_ray.io:read_json"))
    with pytest.raises(ConfigError, match=r"^fl\.strategy\.name: unknown strategy 'nope' \(known: fedavg, "):
        build_strategy(StrategyConfig(name="nope"))


def test_public_holdout_leaves_the_pool_before_partitioning(data_dir):
    raw = {
        "data": {"dataset": "mnist", "test_split": "holdout", "num_test": 200, "num_train": 1000},
        "partition": {"method": "dirichlet", "num_clients": 5, "alpha": 0.5},
        "public_data": {"source": "holdout", "num": 300},
    }
    data = prepare_federated_data(validate_config(raw), seed=0)
    assert data.public is not None and data.public.shape == (300, 1, 28, 28)
    assert sum(data.client_sizes()) == 1000 - 300
    digest = {hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in data.public}
    client_rows = {hashlib.sha1(r.numpy().tobytes()).hexdigest() for x, _ in data.clients for r in x}
    assert not digest & client_rows  # no client holds a public sample
    # fixed by public_data.seed, not by the run seed: every seed's run distils on the same public set
    again = prepare_federated_data(validate_config(raw), seed=1)
    assert torch.equal(again.public, data.public)
    other = prepare_federated_data(
        validate_config({**raw, "public_data": {**raw["public_data"], "seed": 1}}), 0
    )
    assert not torch.equal(other.public, data.public)
    assert np.isfinite(data.public.numpy()).all()


def test_public_data_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"public_data\.num: required when source is .holdout."):
        validate_config({"public_data": {"source": "holdout"}})
    with pytest.raises(ConfigError, match=r"^public_data\.num: must be between 1 and 599"):
        prepare_federated_data(
            validate_config(
                {
                    "data": {"dataset": "mnist", "test_split": "holdout", "num_test": 100, "num_train": 600},
                    "public_data": {"source": "holdout", "num": 600},
                }
            ),
            seed=0,
        )


def test_the_readme_add_an_algorithm_example_works(tmp_path, monkeypatch):
    """The README's five-line algorithm is a valid module:Class strategy whose local loss is applied."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("# my_algos.py", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_algos_readme.py").write_text(block)
    monkeypatch.syspath_prepend(str(tmp_path))
    s = build_strategy(StrategyConfig(name="my_algos_readme:FedL2", weight=0.5))
    assert s.params.weight == 0.5 and s.params.server_lr == 1.0
    logits = torch.tensor([[1.0, -3.0]])
    assert float(s.local_loss(None, None, None, logits)) == pytest.approx(0.5 * (1 + 9) / 2)
