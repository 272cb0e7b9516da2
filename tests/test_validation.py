"""Fail at once: a run's whole config (every step, arm, seed and grid point) is checked before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gptfl_ray.cli import main
from gptfl_ray.config import ConfigError, load_config
from tests.cli_output import error_lines

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
SCAFFOLD_SECAGG = ["fl.secure_aggregation=true", "fl.strategy={name: scaffold}"]

# --set options -> the text the one-line error must contain (each is refused today only when its step starts)
BAD_RUNS = [
    (["fl.strategy={name: nope}"], "fl.strategy.name: unknown strategy 'nope'"),
    (["baselines=[{name: b1}, {name: b2, fl: {strategy: {name: fedprox, mu: -1}}}]"], "baselines[b2]"),
    (["baselines=[{name: b, fl: {rounds: 0}}]"], "baselines[b].fl: rounds"),
    (SCAFFOLD_SECAGG, "fl.secure_aggregation: not supported"),
    (["baselines=[{name: b, fl: {secure_aggregation: true, strategy: {name: scaffold}}}]"], "baselines[b]"),
    (["fl.secagg_clip=.inf"], "fl.secagg_clip: Input should be a finite number"),
    (["pretrain.optimizer.lr=.nan"], "pretrain.optimizer.lr: Input should be a finite number"),
    (["fl.strategy={name: fedprox, mu: .inf}"], "fl.strategy.mu"),
    (["seeds=[0, -1]"], "seeds.1: Input should be greater than or equal to 0"),
    (["data.split_seed=-3"], "data.split_seed"),
    (["name=../escape"], "name: must be a plain folder name"),
    (["name=.."], "name: must be a plain folder name"),
    (["baselines=[{name: a/b}]"], "baselines.0.name: must be a plain folder name"),
    (["generate.options={no_such_option: 1}"], "generate.options.no_such_option: unknown option"),
    (["generate.generator=espeak"], "generate.generator: 'espeak' makes audio"),
    (["prompts.expander.backend=openai"], "prompts.expander.model: required"),
    (["prompts.templates=['{label} in {domain}']"], "prompts.domain"),
    (["labels.source=config"], "labels.names: required"),
    (["model={name: vgg19}"], "model.name: 'vgg19' does not fit mnist inputs"),
    (
        ["fl.strategy={name: feddf}"],
        "public_data.source: fl.strategy.name='feddf' needs unlabeled public data",
    ),
    (["baselines=[{name: df, fl: {strategy: {name: dsfl}}}]"], "baselines[df]: public_data.source:"),
    (["fl.client_model={name: convnet, width: 8}"], "fl.client_model: fl.strategy.name='fedavg' trains"),
    (["public_data={source: holdout}"], "public_data.num: required when source is 'holdout'"),
    (["fl.strategy={name: 'no_such_mod:X'}"], "fl.strategy.name: cannot import 'no_such_mod'"),
    (
        [
            "public_data={source: holdout, num: 9}",
            "fl.strategy={name: fedet}",
            "fl.client_model={name: vgg19}",
        ],
        "fl.client_model.name: 'vgg19' does not fit mnist inputs",
    ),
    (
        ["public_data={source: holdout, num: 9}", "fl.strategy={name: feddf}", "fl.secure_aggregation=true"],
        "fl.secure_aggregation: not supported with fl.strategy.name='feddf'",
    ),
]


@pytest.fixture
def no_ray_no_data(monkeypatch, tmp_path):
    """Neither Ray nor the dataset is reachable: a check that comes too late fails differently."""
    import gptfl_ray.ray_env

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the config was validated")

    monkeypatch.setattr(gptfl_ray.ray_env, "ensure_ray", refuse)
    monkeypatch.setenv("GPTFL_DATA_DIR", str(tmp_path / "no-data-here"))


@pytest.mark.parametrize(("sets", "expected"), BAD_RUNS, ids=[e for _, e in BAD_RUNS])
def test_run_refuses_bad_config_before_any_step(no_ray_no_data, tmp_path, capsys, sets, expected):
    argv = ["run", str(SMOKE), "--output", str(tmp_path / "run")]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "run").exists()


def test_every_shipped_config_validates():
    from gptfl_ray.validate import validate_run

    for path in sorted((REPO / "configs").glob("*.yaml")):
        validate_run(load_config(path))


def test_partition_of_every_seed_is_drawn_before_ray(no_ray_no_data, data_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("GPTFL_DATA_DIR", str(data_dir))
    argv = ["run", str(SMOKE), "--output", str(tmp_path / "run"), "--set", "partition.min_size=200"]
    assert main(argv) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "partition.min_size" in err[0], err


def test_federate_and_generate_validate_their_steps(no_ray_no_data, tmp_path, capsys):
    assert (
        main(
            [
                "federate",
                str(SMOKE),
                "--output",
                str(tmp_path / "fl"),
                *(a for s in SCAFFOLD_SECAGG for a in ("--set", s)),
            ]
        )
        == 2
    )
    assert "fl.secure_aggregation" in capsys.readouterr().err
    assert main(["generate", str(SMOKE), "--set", "generate.options={bogus: 1}"]) == 2
    assert "generate.options.bogus" in capsys.readouterr().err
    assert main(["pretrain", str(SMOKE), "--synthetic", str(tmp_path), "--set", "model={name: vgg19}"]) == 2
    assert "model.name" in capsys.readouterr().err


def test_sweep_validates_every_grid_point(no_ray_no_data, tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "base": str(SMOKE),
                "grid": {
                    "fl.strategy": [{"name": "fedavg"}, {"name": "scaffold"}],
                    "fl.secure_aggregation": [True],
                },
            }
        )
    )
    assert main(["sweep", str(sweep), "--output", str(tmp_path / "out")]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "grid point" in err[0] and "scaffold" in err[0], err
    sweep.write_text(yaml.safe_dump({"name": "s", "base": str(SMOKE), "grid": {"seed": [0, -2]}}))
    assert main(["sweep", str(sweep), "--output", str(tmp_path / "out")]) == 2
    assert "grid.seed" in capsys.readouterr().err
    sweep.write_text(yaml.safe_dump({"name": "../up", "base": str(SMOKE)}))
    assert main(["sweep", str(sweep)]) == 2
    assert "name: must be a plain folder name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ bounded echo
def _alias_bomb(levels: int) -> str:
    """A few hundred bytes of YAML whose aliases expand to 9**levels strings under `name`."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    lines.append(f"name: *l{levels - 1}")
    return "\n".join(lines) + "\n"


def test_error_never_echoes_unbounded_input(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(4))  # < 400 bytes; its value's repr is ~50 kB
    assert len(path.read_bytes()) < 400
    assert main(["federate", str(path)]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr) < 1000, len(stderr)
    assert len(error_lines(stderr)) == 1 and "name: Input should be a valid string" in stderr


def test_alias_bombs_and_recursive_values_are_refused(tmp_path):
    from gptfl_ray.config import check_size

    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(9))  # 9**9 values once expanded
    with pytest.raises(ConfigError, match="alias bomb"):
        load_config(path)
    loop: list = []
    loop.append(loop)
    with pytest.raises(ConfigError, match="refers to itself"):
        check_size({"a": loop}, "x.yaml")
    with pytest.raises(ConfigError, match="nested more than"):
        check_size(yaml.safe_load("[" * 80 + "]" * 80), "x.yaml")
    check_size(yaml.safe_load(SMOKE.read_text()), "smoke.yaml")  # ordinary configs pass
