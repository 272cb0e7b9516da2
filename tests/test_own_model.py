"""Bring your own model: ``model.name: module:callable`` (on Ray, from a module the actors cannot import),
``model.weights`` (torchvision-style state dicts, a differing head kept fresh, one-line errors), and the
``pretrained-init`` arm of ``gptfl run``."""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from gptfl_ray.config import ConfigError, RunConfig, dump_config, load_config, validate_config
from gptfl_ray.errors import InputError, InputNotFoundError, UserError
from gptfl_ray.io import load_weights, read_json, read_jsonl
from gptfl_ray.models import build_model
from gptfl_ray.models.weights import load_model_weights, read_state_dict

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"

PLUGIN_SOURCE = """
import math
from torch import nn


def build(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


class Net(nn.Module):
    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.head = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x):
        return self.head(x.flatten(1))


NOT_CALLABLE = 3


def broken(num_classes, input_shape):
    raise RuntimeError("no such layer")


def not_a_module(num_classes, input_shape):
    return "a string"
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> str:
    """A module the test writes (unique name), importable here only: its folder is on this process's path."""
    name = f"own_models_{uuid.uuid4().hex[:10]}"
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{name}.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    return name


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------------------------ module:callable
def test_plugin_model_builds_function_and_class(plugin):
    net = build_model(f"{plugin}:build", 10, (1, 28, 28))
    assert [tuple(p.shape) for p in net.parameters()] == [(10, 784), (10,)]
    net = build_model(f"{plugin}:Net", 3, (2, 4, 4))
    assert tuple(net(torch.zeros(5, 2, 4, 4)).shape) == (5, 3)


def test_plugin_model_errors_are_one_line_naming_the_field(plugin):
    cases = {
        "no_such_module_xyz:build": "cannot import 'no_such_module_xyz'",
        f"{plugin}:missing": "is not a callable",
        f"{plugin}:NOT_CALLABLE": "is not a callable",
        f"{plugin}:broken": "does not build for 10 classes and inputs (1, 28, 28) (RuntimeError: no such layer)",
        f"{plugin}:not_a_module": "returned str, not a torch nn.Module",
    }
    for name, expected in cases.items():
        with pytest.raises(ConfigError) as err:
            build_model(name, 10, (1, 28, 28))
        assert one_line(err).startswith("model.name: ") and expected in str(err.value)
    for bad in ("mod:", ":build", "a b:c"):  # syntax: at config load, no import
        with pytest.raises(ConfigError, match=r"model\.name: must be module:callable"):
            validate_config({"model": {"name": bad}})
    with pytest.raises(ConfigError, match=r"model\.width: a module:callable model takes no model\.width"):
        validate_config({"model": {"name": f"{plugin}:build", "width": 8}})


def test_check_model_runs_plugin_on_meta_device(plugin):
    from gptfl_ray.validate import check_model

    check_model(validate_config({"model": {"name": f"{plugin}:build"}}))
    with pytest.raises(ConfigError) as err:
        check_model(validate_config({"model": {"name": f"{plugin}:broken"}}))
    assert one_line(err).startswith("model.name: ")


@pytest.mark.slow
def test_plugin_model_runs_one_round_on_ray(ray_session, data_dir, plugin, tmp_path):
    """The actors cannot import the module: the resolved callable reaches them by value."""
    from gptfl_ray.fl.runner import run_federated

    def importable(name: str) -> bool:
        import importlib.util

        return importlib.util.find_spec(name) is not None

    assert not ray_session.get(ray_session.remote(importable).remote(plugin))
    cfg = validate_config(
        {
            "data": {"dataset": "mnist", "test_split": "holdout", "num_test": 200, "num_train": 300},
            "partition": {"method": "iid", "num_clients": 3},
            "model": {"name": f"{plugin}:build"},
            "fl": {
                "rounds": 1,
                "clients_per_round": 3,
                "local": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.1}},
                "num_actors": 1,
            },
        }
    )
    summary = run_federated(cfg, seed=0, out_dir=tmp_path / "fl")
    (rec,) = read_jsonl(tmp_path / "fl" / "metrics.jsonl")
    assert rec["round"] == 1 and rec["num_updates"] == 3 and 0.0 <= rec["accuracy"] <= 1.0
    assert summary["final_accuracy"] == rec["accuracy"]
    final = load_weights(tmp_path / "fl" / "final.safetensors")
    assert {k: tuple(v.shape) for k, v in final.items()} == {"1.weight": (10, 784), "1.bias": (10,)}
    torch.manual_seed(0)  # the run's initial model; one round of training moved it
    init = build_model(f"{plugin}:build", 10, (1, 28, 28)).state_dict()
    assert not torch.equal(final["1.weight"], init["1.weight"])


# ------------------------------------------------------------------------------------ model.weights
def _torchvision_resnet18(num_classes: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_load_torchvision_resnet18_with_fresh_head(tmp_path, suffix):
    """An ImageNet-shaped torchvision state dict (1000 classes) into the registry's resnet18 at 96×96 RGB (the
    ImageNet stem): every tensor but the 10-class head is the file's, the head keeps its fresh init."""
    tv = _torchvision_resnet18(1000)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(tv, path)
    else:
        save_file({k: v.contiguous() for k, v in tv.items()}, str(path))
    torch.manual_seed(0)
    model = build_model("resnet18", 10, (3, 96, 96))
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc.")}
    assert sorted(load_model_weights(model, path)) == ["fc.bias", "fc.weight"]
    state = model.state_dict()
    assert set(state) == set(tv)
    for k, v in state.items():
        assert torch.equal(v, fresh_head[k] if k.startswith("fc.") else tv[k]), k
    assert tuple(state["fc.weight"].shape) == (10, 512)


def test_weights_same_head_shape_load_whole(tmp_path):
    tv = _torchvision_resnet18(10)
    torch.save(tv, tmp_path / "r.pt")
    model = build_model("resnet18", 10, (3, 96, 96))
    assert load_model_weights(model, tmp_path / "r.pt") == []
    assert all(torch.equal(v, tv[k]) for k, v in model.state_dict().items())


def test_bad_weights_files_are_one_line_errors_naming_the_file(tmp_path):
    model = build_model("resnet18", 10, (3, 32, 32))  # CIFAR stem: conv1 is 3×3, torchvision's is 7×7
    torch.save(_torchvision_resnet18(1000), tmp_path / "imagenet.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a pickle" * 10)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    torch.save({"w": torch.zeros(2), "cfg": {"lr": 0.1}, "obj": torch.nn.Linear(2, 2)}, tmp_path / "obj.pth")
    torch.save(build_model("cnn", 10, (1, 28, 28)).state_dict(), tmp_path / "cnn.pth")
    cases = {
        "missing.pth": (InputNotFoundError, "model.weights file not found"),
        "imagenet.pth": (
            InputError,
            "does not fit the model (shape: conv1.weight (64, 3, 7, 7) vs (64, 3, 3, 3))",
        ),
        "garbage.pth": (InputError, "is not a readable state dict (UnpicklingError"),
        "empty.safetensors": (InputError, "is not a readable state dict"),
        "obj.pth": (InputError, "is not a readable state dict"),  # weights_only refuses the module object
        "cnn.pth": (
            InputError,
            "does not fit the model (missing: conv1.weight, bn1.weight, bn1.bias …; unexpected",
        ),
    }
    for name, (kind, expected) in cases.items():
        with pytest.raises(kind) as err:
            load_model_weights(model, tmp_path / name)
        assert isinstance(err.value, UserError) and one_line(err).startswith(f"{tmp_path / name}: "), name
        assert expected in str(err.value), (name, str(err.value))
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(InputError, match="holds no state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_check_model_validates_weights_file(tmp_path):
    from gptfl_ray.validate import check_model

    torch.save(
        build_model("convnet", 7, (1, 28, 28), width=8).state_dict(), tmp_path / "ok.pth"
    )  # head differs
    torch.save(build_model("convnet", 10, (1, 28, 28), width=4).state_dict(), tmp_path / "narrow.pth")
    check_model(
        validate_config({"model": {"name": "convnet", "width": 8, "weights": str(tmp_path / "ok.pth")}})
    )
    with pytest.raises(InputError, match=r"narrow\.pth: model\.weights does not fit the model \(shape: "):
        check_model(
            validate_config(
                {"model": {"name": "convnet", "width": 8, "weights": str(tmp_path / "narrow.pth")}}
            )
        )


def test_unset_weights_leave_dumped_config_and_keys_unchanged(tmp_path):
    from gptfl_ray.pretrain import pretrain_key

    assert "weights" not in dump_config(RunConfig())["model"]
    cfg = RunConfig()
    path = tmp_path / "w.pth"
    torch.save(build_model("convnet", 10, (1, 28, 28)).state_dict(), path)
    with_w = cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": path})})
    k0, k1 = pretrain_key(cfg, "syn", 0), pretrain_key(with_w, "syn", 0)
    assert k0 != k1 and pretrain_key(with_w, "syn", 0) == k1
    time.sleep(0.01)
    torch.save(build_model("convnet", 10, (1, 28, 28), width=64).state_dict(), path)  # same path, new file
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert pretrain_key(with_w, "syn", 0) != k1


# ------------------------------------------------------------------------------------ pretrained-init arm
@pytest.mark.slow
def test_pretrained_init_arm_report_row(tmp_path, smoke_run):
    """`gptfl run` with model.weights: GPT-FL pretraining starts from them (at a negligible learning rate its
    result is the file's weights), and the pretrained-init arm runs FL from them and gets its report row.
    model.weights does not change what is generated: the smoke run's synthetic set is reused (copied in)."""
    from gptfl_ray.run import PRETRAINED_INIT_ARM, run

    torch.manual_seed(7)
    saved = build_model(
        "convnet", 7, (1, 28, 28), width=8
    ).state_dict()  # 7 classes: MNIST's head stays fresh
    weights = tmp_path / "mine.pth"
    torch.save(saved, weights)
    cfg = load_config(
        SMOKE,
        overrides=[
            f"model.weights={weights}",
            "fl.rounds=1",
            "baselines=[]",
            "pretrain.epochs=1",
            "pretrain.optimizer.lr=1.0e-12",
        ],
    )
    run_dir = tmp_path / "run"
    (synthetic,) = smoke_run[1].glob("synthetic-*")
    shutil.copytree(synthetic, run_dir / synthetic.name)
    out = run(cfg, run_dir)
    arms = out["results"]["arms"]
    assert set(arms) == {"gptfl", PRETRAINED_INIT_ARM}
    (init_file,) = run_dir.glob("init-*-seed0.safetensors")
    init = load_weights(init_file)
    (pre,) = run_dir.glob("pretrain-*-seed0")
    pretrained = load_weights(pre / "weights.safetensors")
    torch.manual_seed(0)
    fresh = build_model("convnet", 10, (1, 28, 28), width=8).state_dict()
    for k, v in init.items():
        head = k.startswith("classifier.")
        assert torch.equal(v, fresh[k] if head else saved[k]), k
        assert torch.allclose(pretrained[k], v, atol=1e-6), k
    for arm in arms.values():
        rounds = read_jsonl(run_dir / arm["0"]["dir"] / "metrics.jsonl")
        assert [r["round"] for r in rounds] == [1]
    assert read_json(run_dir / arms[PRETRAINED_INIT_ARM]["0"]["dir"] / "run.json")["init"] == str(init_file)
    report = (run_dir / "report.md").read_text()
    acc = arms[PRETRAINED_INIT_ARM]["0"]["final_accuracy"]
    assert (
        f"| {PRETRAINED_INIT_ARM} | {100 * acc:.2f} |" in report
        and "`pretrained-init` = FL starting" in report
    )
    assert not math.isnan(acc)
