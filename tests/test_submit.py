"""``gptfl submit``: job description (entrypoint, upload set, config staging, auth token) and real submissions.

The integration tests start a private Ray head (``ray start --head --block`` in its own process group, own
--temp-dir, every port chosen free, token auth on with a fresh token) and stop only that process group, so
other Ray instances on the machine are never touched.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gptfl_ray import cli
from gptfl_ray.cli import UserError
from gptfl_ray.config import ConfigError
from gptfl_ray.submit import (
    CONFIG_DIR_IN_JOB,
    build_entrypoint,
    check_address,
    config_files,
    connect,
    dashboard_link,
    follow,
    make_job_request,
    normalize_address,
    read_auth_token,
    staged_working_dir,
    submit,
    submit_command,
    upload_excludes,
)
from tests.cli_output import error_lines

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port(taken: set[int] | frozenset[int] = frozenset()) -> int:
    """A free port in 20000-32767: above Ray's worker ports (10002-19999) and below Linux's ephemeral range
    (32768+), so no other process's outgoing connection can take it before the head binds it. (Port 0, an
    ephemeral port, raced with the busy Ray instances of other tests on a loaded machine.)"""
    rng = secrets.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(20_000, 32_768)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


# ------------------------------------------------------------------------------------ unit tests
def test_token_lookup_follows_rays_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-file\n")
    token_file = tmp_path / "tok"
    token_file.write_text("from-path-env")
    assert read_auth_token({"HOME": str(home)}) == "from-file"
    assert read_auth_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(token_file)}) == "from-path-env"
    env = {"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_AUTH_TOKEN": "from-env"}
    assert read_auth_token(env) == "from-env"
    assert read_auth_token({"HOME": str(tmp_path / "nobody")}) is None
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH"):
        read_auth_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_local_token_file_stays_on_this_machine(tmp_path):
    """~/.ray/auth_token is the local cluster's token: sent to a loopback dashboard only, unless named."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("local-token\n")
    env = {"HOME": str(home)}
    for remote in ("https://ray.example.org:8265", "http://10.0.0.7:8265"):
        assert read_auth_token(env, address=remote) is None
    for local in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265"):
        assert read_auth_token(env, address=local) == "local-token"
    asked = {**env, "RAY_AUTH_TOKEN_PATH": str(home / ".ray" / "auth_token")}  # named explicitly: sent
    assert read_auth_token(asked, address="https://ray.example.org:8265") == "local-token"
    assert read_auth_token({**env, "RAY_AUTH_TOKEN": "t"}, address="https://ray.example.org") == "t"


def test_plain_http_to_another_host_needs_insecure(tmp_path, capsys):
    """Checked before any request or upload (nothing listens at 10.0.0.7: a request would hang, not fail)."""
    assert check_address("http://127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert check_address("https://ray.example.org:8265/") == "https://ray.example.org:8265"
    assert check_address("http://10.0.0.7:8265", insecure=True) == "http://10.0.0.7:8265"
    with pytest.raises(UserError, match=r"^--address http://10\.0\.0\.7:8265: the job .* --insecure\)$"):
        connect("http://10.0.0.7:8265", "token")
    with pytest.raises(UserError, match=r"--address ray\.example\.org:8265: give the scheme: https://"):
        normalize_address("ray.example.org:8265")  # a bare remote host no longer means http://
    config = tmp_path / "c.yaml"
    config.write_text("name: c\nprompts: {num_per_class: 2}\n")  # a valid run config
    assert cli.main(["submit", str(config), "--address", "http://10.0.0.7:8265"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("gptfl submit: error: --address http://10.0.0.7:8265: ")


def test_submit_does_not_judge_the_cluster_s_keys_by_this_environment(tmp_path, capsys, monkeypatch):
    """A job's API keys come from the cluster's environment: a key set here does not make an in-cluster http://
    endpoint an error at submit time (the job applies the key rule where it runs)."""
    monkeypatch.setenv("GPTFL_TEST_KEY", "sk-local")
    config = tmp_path / "c.yaml"
    config.write_text(
        "name: c\nprompts:\n  num_per_class: 2\n  expander:\n    backend: openai\n    model: m\n"
        "    base_url: http://llm.cluster.svc:8000/v1\n    api_key_env: GPTFL_TEST_KEY\n"
    )
    assert cli.main(["generate", str(config)]) == 2  # run here, the local key would travel in clear text
    assert "GPTFL_TEST_KEY" in error_lines(capsys.readouterr().err)[0]
    assert cli.main(["submit", str(config), "--address", "http://10.0.0.7:8265"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("gptfl submit: error: --address http://10.0.0.7:8265: ")


def test_entrypoint_is_a_valid_quoted_gptfl_command():
    overrides = ["fl.rounds=5", "name=a b", "fl.strategy={name: fedprox, mu: 0.01}"]
    entry = build_entrypoint(
        "run", ".gptfl-submit/x.yaml", overrides, "/mnt/gptfl/data", "--output '/mnt/gptfl/runs/my run'"
    )
    argv = shlex.split(entry)
    assert argv[:3] == ["gptfl", "run", ".gptfl-submit/x.yaml"]
    args = cli.build_parser().parse_args(argv[1:])  # the job's command line parses as a real gptfl command
    assert args.overrides == overrides
    assert args.data_dir == "/mnt/gptfl/data"
    assert args.output == "/mnt/gptfl/runs/my run"
    sweep = shlex.split(build_entrypoint("sweep", "s.yaml", [], None, "--smoke"))
    assert cli.build_parser().parse_args(sweep[1:]).smoke
    # Shell metacharacters stay literal arguments: nothing is expanded or executed by the job's shell.
    assert shlex.split(build_entrypoint("run", "c.yaml", ["name=$(rm -rf ~)"]))[-1] == "name=$(rm -rf ~)"
    with pytest.raises(UserError, match="--extra-args"):
        build_entrypoint("run", "c.yaml", [], None, "--output 'unclosed")


def test_upload_excludes_big_files_and_skips_venv(tmp_path):
    (tmp_path / "gptfl_ray").mkdir()
    (tmp_path / "gptfl_ray" / "small.py").write_text("x = 1\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin2").write_bytes(b"\0" * 2048)
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "huge").write_bytes(b"\0" * 4096)
    excludes = upload_excludes(tmp_path, max_file_bytes=1024)
    assert "/data/big.bin2" in excludes
    assert not any("small.py" in e or "huge" in e for e in excludes)
    assert "*.safetensors" in excludes and "__pycache__" in excludes


def test_sweep_ships_its_base_config(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "base.yaml").write_text("name: b\n")
    sweep = tmp_path / "sweeps" / "s.yaml"
    sweep.parent.mkdir()
    sweep.write_text("name: s\nbase: ../runs/base.yaml\ngrid: {seed: [0, 1]}\n")
    files = config_files(sweep, sweep=True)
    assert files["s.base.yaml"] == "name: b\n"
    assert yaml.safe_load(files["s.yaml"]) == {"name": "s", "base": "s.base.yaml", "grid": {"seed": [0, 1]}}
    assert config_files(sweep, sweep=False) == {"s.yaml": sweep.read_text()}
    sweep.write_text("name: s\nbase: nope.yaml\n")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        config_files(sweep, sweep=True)


def test_staged_working_dir_is_the_checkout_plus_config(tmp_path):
    config = tmp_path / "outside.yaml"
    config.write_text("name: outside\n")
    job = make_job_request(config, overrides=["fl.rounds=1"])
    assert job.entrypoint.startswith(f"gptfl run {CONFIG_DIR_IN_JOB}/outside.yaml --set fl.rounds=1")
    assert job.submission_id.startswith("gptfl-run-outside-")
    with staged_working_dir(job) as stage:
        names = {p.name for p in stage.iterdir()}
        assert {"gptfl_ray", "pyproject.toml", CONFIG_DIR_IN_JOB} <= names
        assert not names & {".git", ".venv", "runs"}
        assert (stage / "gptfl_ray" / "submit.py").read_text() == (
            REPO / "gptfl_ray" / "submit.py"
        ).read_text()
        assert (stage / job.config_in_job).read_text() == "name: outside\n"
    assert not stage.exists()
    assert not (REPO / CONFIG_DIR_IN_JOB).exists()  # the checkout itself is never written to


def test_refuses_to_upload_anything_but_a_checkout(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: c\n")
    (tmp_path / "gptfl_ray").mkdir()  # e.g. site-packages of a non-editable install: no pyproject.toml
    with pytest.raises(UserError, match="source checkout"):
        make_job_request(config, project_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        make_job_request(tmp_path / "missing.yaml")


def test_address_normalisation():
    assert normalize_address("127.0.0.1:8265/") == "http://127.0.0.1:8265"
    assert dashboard_link("https://ray.example.org", "j1") == "https://ray.example.org/#/jobs/j1"
    with pytest.raises(UserError, match="ray://"):
        normalize_address("ray://head:10001")


def test_unreachable_address_is_one_line_error_naming_it(tmp_path, capsys):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(UserError, match=address):
        connect(address, None)
    config = tmp_path / "c.yaml"
    config.write_text("name: c\nprompts: {num_per_class: 2}\n")  # a valid run config: the address fails
    assert cli.main(["submit", str(config), "--address", address]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and address in err[0] and err[0].startswith("gptfl submit: error:")


def test_sweep_submission_validates_the_sweep_before_connecting(tmp_path):
    """`gptfl submit --sweep` checks the sweep file and its base config locally, then fails on the address."""
    address = f"http://127.0.0.1:{free_port()}"
    args = argparse.Namespace(
        config=str(REPO / "tune_configs" / "quickstart.yaml"),
        overrides=["fl.rounds=2"],
        address=address,
        sweep=True,
        wait=False,
        extra_args="--smoke",
        data_dir=None,
        verbose=False,
    )
    with pytest.raises(UserError, match=address):  # validation passed: the next failure is the connection
        submit_command(args)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text("name: s\n")
    bad = tmp_path / "sweeps" / "bad-sweep.yaml"
    bad.parent.mkdir()
    bad.write_text("name: bad\nbase: ../configs/base.yaml\ngrid: {fl.rounds: [0]}\n")
    with pytest.raises(ConfigError, match="fl.rounds"):
        submit_command(argparse.Namespace(**{**vars(args), "config": str(bad)}))


# ----------------------------------------------------------------------------- a private Ray head
@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """(dashboard URL, auth token) of a Ray head started for this module and stopped after it.

    Its logs are kept in pytest's base temp dir (``ray-head-logs``) for diagnosing a head that died.
    """
    tmp = Path(tempfile.mkdtemp(prefix="rsub", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(32)
    ports: dict[str, int] = {}
    for name in (
        "port",
        "dashboard-port",
        "ray-client-server-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
        "node-manager-port",
        "object-manager-port",
    ):
        ports[name] = free_port(set(ports.values()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GPTFL_"))}
    # `gptfl` must be on the job's PATH, as it is in the cluster image; HOME keeps ~/.ray/ private.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HOME=str(tmp), PATH=f"{VENV_BIN}:{env['PATH']}")
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={tmp}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--disable-usage-stats",
        *(f"--{k}={v}" for k, v in ports.items()),
    ]
    log_path = tmp / "ray-start.log"
    with open(log_path, "wb") as log_file:
        head = subprocess.Popen(
            cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        _wait_for_dashboard(url, token, head, log_path)
        yield url, token
    finally:
        _stop_process_group(head)
        keep = tmp_path_factory.getbasetemp() / "ray-head-logs"
        try:
            shutil.copytree(tmp / "session_latest" / "logs", keep, dirs_exist_ok=True)
            shutil.copy(log_path, keep / "ray-start.log")
        except OSError:  # the head never got as far as writing logs: nothing to keep
            pass
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_dashboard(url: str, token: str, head: subprocess.Popen, log_path: Path) -> None:
    import requests

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited ({head.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"Ray dashboard at {url} did not come up:\n{log_path.read_text()[-3000:]}")


def _stop_process_group(head: subprocess.Popen) -> None:
    """SIGTERM to our `ray start --block` (it shuts its node down), then SIGKILL whatever is left of its group."""
    pgid = head.pid  # start_new_session=True: the leader's pid is the group id
    head.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=3)  # its graceful stop is not under test; the group kill below is sure
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    head.wait(timeout=10)


# ------------------------------------------------------------------------------ integration tests
@pytest.mark.slow
def test_auth_is_required_and_checked(ray_head):
    url, token = ray_head
    with pytest.raises(UserError, match="no token found"):
        connect(url, None)
    with pytest.raises(UserError, match="token was rejected"):
        connect(url, "not-the-token")
    assert connect(url, token).get_version()


@pytest.mark.slow
def test_submission_machinery_with_a_trivial_entrypoint(ray_head, tmp_path):
    """What `gptfl submit` uploads and how the job runs, checked from inside the job itself."""
    url, token = ray_head
    config = tmp_path / "probe.yaml"
    config.write_text("name: probe\n")
    job = make_job_request(config, overrides=["fl.rounds=1"])
    probe = (
        "import os, pathlib, ray, gptfl_ray; "
        "cwd = pathlib.Path.cwd(); "
        f"assert (cwd / '{job.config_in_job}').read_text() == 'name: probe\\n'; "
        "assert pathlib.Path(gptfl_ray.__file__).resolve().is_relative_to(cwd.resolve()), gptfl_ray.__file__; "
        "assert (cwd / 'gptfl_ray' / 'submit.py').is_file() and (cwd / 'pyproject.toml').is_file(); "
        "assert not any((cwd / d).exists() for d in ('.git', '.venv', 'runs')); "
        "assert os.environ['PYTHONUNBUFFERED'] == '1'; "
        "ray.init(); "  # the driver joins the cluster (token auth on) as `gptfl run` will
        "print('PROBE-OK', int(ray.cluster_resources()['CPU']))"
    )
    job = dataclasses.replace(job, entrypoint=shlex.join(["python", "-c", probe]))
    client = connect(url, token)
    submission_id = submit(client, job)
    assert submission_id == job.submission_id
    out = io.StringIO()
    code = follow(client, submission_id, out=out)
    assert code == 0, out.getvalue()[-3000:]
    assert "PROBE-OK 2" in out.getvalue()
    info = client.get_job_info(submission_id)
    assert info.metadata["gptfl_config"] == str(config)
    assert info.metadata["gptfl_overrides"] == "fl.rounds=1"


@pytest.mark.slow
def test_sweep_file_and_its_base_travel_and_validate_in_the_job(ray_head):
    url, token = ray_head
    job = make_job_request(REPO / "tune_configs" / "quickstart.yaml", sweep=True, overrides=["fl.rounds=2"])
    assert shlex.split(job.entrypoint)[:3] == ["gptfl", "sweep", job.config_in_job]
    check = (
        "from gptfl_ray.sweep import load_sweep; "
        f"sweep, run = load_sweep({job.config_in_job!r}, ['fl.rounds=2']); "
        "print('SWEEP-OK', sweep.name, run.fl.rounds)"
    )
    job = dataclasses.replace(job, entrypoint=shlex.join(["python", "-c", check]))
    client = connect(url, token)
    out = io.StringIO()
    assert follow(client, submit(client, job), out=out) == 0, out.getvalue()[-3000:]
    assert "SWEEP-OK quickstart 2" in out.getvalue()


@pytest.mark.slow
def test_failed_job_returns_its_exit_status(ray_head, tmp_path, capsys):
    url, token = ray_head
    config = tmp_path / "fails.yaml"
    config.write_text("name: fails\n")
    job = make_job_request(config)
    job = dataclasses.replace(job, entrypoint="python -c 'import sys; print(\"failing\"); sys.exit(3)'")
    client = connect(url, token)
    assert follow(client, submit(client, job), out=io.StringIO()) == 3
    assert "FAILED" in capsys.readouterr().err


SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"
# `gptfl run` chains every step, so the smoke job needs every subcommand's module in place.
MISSING_STEPS = sorted(
    m for m, _, _ in cli.COMMANDS.values() if not (REPO / (m.replace(".", "/") + ".py")).is_file()
)


@pytest.mark.slow
@pytest.mark.skipif(not SMOKE_CONFIG.is_file(), reason="needs configs/smoke.yaml")
@pytest.mark.skipif(bool(MISSING_STEPS), reason=f"`gptfl run` is not complete yet: missing {MISSING_STEPS}")
def test_gptfl_submit_smoke_run_succeeds(ray_head, data_dir, tmp_path, monkeypatch, capsys):
    """The real thing: `gptfl submit configs/smoke.yaml --wait` runs all four steps as a Ray Job."""
    url, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    runs = tmp_path / "runs"
    argv = ["submit", str(SMOKE_CONFIG), "--address", url, "--wait", "--data-dir", str(data_dir)]
    # every step runs; one epoch, one arm and one round are enough to show it (the steps' numbers are tested
    # elsewhere)
    argv += ["--set", f"output_dir={runs}", "--set", "pretrain.epochs=1", "--set", "fl.rounds=1"]
    argv += ["--set", "baselines=[]"]
    code = cli.main(argv)
    out = capsys.readouterr()
    assert code == 0, (out.out + out.err)[-5000:]
    assert "submitted job gptfl-run-smoke-" in out.out
    assert f"{url}/#/jobs/gptfl-run-smoke-" in out.out
    run_dirs = [p for p in runs.iterdir() if p.is_dir() and p.name.startswith("smoke-")]
    assert len(run_dirs) == 1 and (run_dirs[0] / "report.md").is_file()  # written where we asked
