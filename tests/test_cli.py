"""The CLI's error contract: user errors are one line (exit 2), bugs show their traceback and a hint (exit 1);
``run --resume`` refuses a CONFIG that would change the run's results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptfl_ray.cli import main
from gptfl_ray.config import load_config, save_config
from tests.cli_output import error_lines

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def finished_run_folder(tmp_path: Path) -> Path:
    """The smallest folder `gptfl report` accepts: a results index with no arms."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"name": "x", "seeds": [0], "arms": {}}))
    return run_dir


def test_internal_error_shows_traceback_and_hint(tmp_path, monkeypatch, capsys):
    import gptfl_ray.report

    def buggy(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(gptfl_ray.report, "report_command", buggy)
    assert main(["report", str(finished_run_folder(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "an internal invariant broke" in err
    assert err.strip().splitlines()[-1].startswith("gptfl report: internal error (ValueError)")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["report", "/nonexistent/run"], "no such folder"),
        (["run"], "the following arguments are required: config"),
        (["federate", str(SMOKE), "--seed", "-1"], "--seed: must be in 0..4294967295"),
        (["run", str(SMOKE), "--set", "fl.rounds"], "expected KEY=VALUE"),
        (["nosuchcommand"], "invalid choice"),
    ],
)
def test_user_error_is_exactly_one_line(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPTFL_DATA_DIR", str(tmp_path / "no-data-here"))  # nothing may start real work
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and expected in err, err


def test_report_refuses_a_folder_that_is_not_a_finished_run(tmp_path, capsys):
    run_dir = finished_run_folder(tmp_path)
    (run_dir / "results.json").write_text(json.dumps({"arms": {"gptfl": {"0": {"dir": "fl/gone"}}}}))
    assert main(["report", str(run_dir)]) == 2
    assert "summary.json of arm gptfl seed 0 missing" in capsys.readouterr().err
    (run_dir / "results.json").write_text("[1, 2]")
    assert main(["report", str(run_dir)]) == 2
    assert 'not a gptfl results index (no "arms" mapping)' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ --resume
@pytest.fixture
def interrupted_run(tmp_path, monkeypatch) -> Path:
    """A run folder holding the smoke config (with fl.rounds=6); Ray and the data are out of reach."""
    import gptfl_ray.ray_env

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(gptfl_ray.ray_env, "ensure_ray", refuse)
    monkeypatch.setenv("GPTFL_DATA_DIR", str(tmp_path / "no-data-here"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(load_config(SMOKE, ["fl.rounds=6"]), run_dir / "config.yaml")
    return run_dir


def test_resume_refuses_a_config_that_changes_results(interrupted_run, capsys):
    before = (interrupted_run / "config.yaml").read_text()
    argv = ["run", str(SMOKE), "--resume", str(interrupted_run), "--set", "fl.rounds=6"]
    assert main([*argv, "--set", "fl.local.batch_size=8", "--set", "seeds=[0,1]"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "differs from" in err[0], err
    assert "fl.local.batch_size" in err[0] and "seeds" in err[0] and "fl.rounds" not in err[0]
    assert main(["run", str(SMOKE), "--resume", str(interrupted_run)]) == 2  # CONFIG without its --set
    assert "fl.rounds" in capsys.readouterr().err
    assert (interrupted_run / "config.yaml").read_text() == before  # not overwritten


def test_resume_accepts_the_same_config(interrupted_run, capsys):
    from gptfl_ray.run import check_resume

    same = load_config(SMOKE, ["fl.rounds=6", "ray_address=auto", "output_dir=/elsewhere"])
    assert check_resume(same, interrupted_run) is True  # where things are is no result-affecting field
    argv = ["run", str(SMOKE), "--resume", str(interrupted_run), "--set", "fl.rounds=6"]
    assert main(argv) == 2  # passed the config check; stops at the (missing) data, still before Ray
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "no-data-here" in err[0], err
