from pathlib import Path

import pytest

from gptfl_ray.cli import main
from gptfl_ray.config import ConfigError, config_hash, load_config
from tests.cli_output import error_lines


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_loads_and_overrides(tmp_path):
    p = write(tmp_path, "name: x\nfl:\n  rounds: 3\n  local:\n    batch_size: 16\n")
    cfg = load_config(p, ["fl.local.optimizer.lr=0.1", "partition.alpha=0.1", "seeds=[1,2,3]"])
    assert cfg.fl.rounds == 3 and cfg.fl.local.batch_size == 16
    assert cfg.fl.local.optimizer.lr == 0.1 and cfg.partition.alpha == 0.1 and cfg.seeds == [1, 2, 3]


def test_typo_key_names_field_and_file(tmp_path):
    p = write(tmp_path, "fl:\n  roundz: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: fl\.roundz: unknown key"):
        load_config(p)


def test_wrong_type_names_field(tmp_path):
    p = write(tmp_path, "fl:\n  local:\n    optimizer:\n      lr: fast\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: fl\.local\.optimizer\.lr: .*number.*'fast'"):
        load_config(p)


def test_bad_override_names_field(tmp_path):
    p = write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError, match=r"partition\.num_clients"):
        load_config(p, ["partition.num_clients=-1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(p, ["fl.rounds"])


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="line 3 invalid YAML"):
        load_config(write(tmp_path, "a: 1\nb: [\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_hash_tracks_content(tmp_path):
    p = write(tmp_path, "name: x\n")
    a, b = load_config(p), load_config(p, ["generate.batch_size=3"])
    assert config_hash(a.generate) == config_hash(load_config(p).generate)
    assert config_hash(a.generate) != config_hash(b.generate)
    assert config_hash(a.fl) == config_hash(b.fl)


def test_cli_reports_one_line_error(tmp_path, capsys):
    p = write(tmp_path, "fl:\n  rouds: 3\n")
    assert main(["federate", str(p)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "fl.rouds: unknown key" in err[0]
