"""``gptfl submit``: run ``gptfl run`` / ``gptfl sweep`` on a Ray cluster as a Ray Job.

The job's working dir is this project checkout (minus .git, .venv, runs/, caches and big files), so the
cluster runs exactly the code you have; Ray puts it first on the job's PYTHONPATH. The config file travels
inside it under ``.gptfl-submit/`` wherever it lives locally (a sweep file takes its ``base`` run config
along). The dashboard's token (Ray >= 2.52 token auth) is read from ``$RAY_AUTH_TOKEN``,
``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` - Ray's own lookup order - and sent as
``Authorization: Bearer <token>`` on every request. ``~/.ray/auth_token`` is this machine's own cluster's
token: it is sent only to a loopback address (name the file in ``$RAY_AUTH_TOKEN_PATH`` to send it elsewhere).
The job (code, config, token) never goes over plain ``http://`` to another host unless ``--insecure`` is given
(see :mod:`gptfl_ray.transport`); a bare ``HOST:PORT`` means ``http://`` only for a loopback host.

    gptfl submit configs/mnist-glyphs.yaml --address http://127.0.0.1:8265 \\
        --set output_dir=/mnt/gptfl/runs --wait
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from gptfl_ray.config import read_yaml
from gptfl_ray.errors import InputNotFoundError, UserError
from gptfl_ray.transport import check_endpoint, retry_wait, url_is_loopback

if TYPE_CHECKING:  # ray.job_submission pulls in requests/aiohttp: imported only when submitting
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
AGENT_WAIT_S = 120  # how long a submission waits for a just-started head's job agent
AGENT_RETRY_S = 2.0  # base wait between submissions while the job agent starts (jittered)
# Where the config file sits inside the job's working dir (and so on the cluster, relative to the job's cwd).
CONFIG_DIR_IN_JOB = ".gptfl-submit"
# Top-level entries of the checkout that never travel (gitignored paths are skipped by Ray as well).
SKIPPED_TOP_LEVEL = frozenset({".git", ".venv", "venv", "runs", "build", "dist"})
# Patterns (gitignore syntax, relative to the working dir) Ray must not upload.
UPLOAD_EXCLUDES = (
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "*.egg-info",
    "*.safetensors",
    "*.parquet",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.bin",
    "*.onnx",
    "*.npz",
)
# Files above this size stay home (Ray warns at 10 MiB and caps a package at its gRPC message size);
# data and weights belong on shared storage or the model hub, not in the job package.
MAX_UPLOAD_FILE_BYTES = 10 * 1024 * 1024
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class JobRequest:
    """Everything ``JobSubmissionClient.submit_job`` needs, built without touching the network."""

    entrypoint: str
    submission_id: str
    working_dir: Path  # the project root as it should appear on the cluster (minus excludes)
    config_in_job: str  # the config's path relative to the job's working dir
    files: dict[str, str] = field(default_factory=dict)  # name in CONFIG_DIR_IN_JOB -> text (config, base)
    excludes: list[str] = field(default_factory=list)
    env_vars: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ auth token
def read_auth_token(env: Mapping[str, str] | None = None, address: str | None = None) -> str | None:
    """The Ray dashboard token, looked up the way Ray does (env var, token-path env var, ~/.ray/auth_token).

    Returns None when there is none (a cluster without token auth). A ``$RAY_AUTH_TOKEN_PATH`` that points
    at a missing or empty file is an error, as it is for Ray. ``~/.ray/auth_token`` (the local cluster's token)
    is used only when ``address`` is None or a loopback address: it is never sent to a remote dashboard.
    """
    env = os.environ if env is None else env
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path_env = env.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path_env:
        path = Path(path_env).expanduser()
        token = path.read_text().strip() if path.is_file() else ""
        if not token:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path_env}: no token in that file")
        return token
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    path = home / ".ray" / "auth_token"
    if not path.is_file():
        return None
    if address is not None and not url_is_loopback(address):
        log.warning(
            "not sending %s (this machine's own cluster token) to %s; to use it there, set "
            "RAY_AUTH_TOKEN_PATH=%s",
            path,
            address,
            path,
        )
        return None
    return path.read_text().strip() or None


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


# ---------------------------------------------------------------------------------- job request
def build_entrypoint(
    command: str,
    config_in_job: str,
    overrides: Sequence[str] = (),
    data_dir: str | None = None,
    extra_args: str = "",
) -> str:
    """``gptfl run <config> --set k=v ... [--data-dir D] <extra>``, every argument shell-quoted."""
    argv = ["gptfl", command, config_in_job]
    for text in overrides:
        argv += ["--set", text]
    if data_dir:
        argv += ["--data-dir", data_dir]
    try:
        argv += shlex.split(extra_args)
    except ValueError as err:
        raise UserError(f"--extra-args {extra_args!r}: {err}") from None
    return shlex.join(argv)


def upload_excludes(root: Path, max_file_bytes: int = MAX_UPLOAD_FILE_BYTES) -> list[str]:
    """``UPLOAD_EXCLUDES`` plus an anchored pattern for every file in ``root`` above ``max_file_bytes``."""
    excludes = list(UPLOAD_EXCLUDES)
    skip_dirs = SKIPPED_TOP_LEVEL | {p for p in UPLOAD_EXCLUDES if "*" not in p}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size > max_file_bytes:
                rel = path.relative_to(root).as_posix()
                log.warning(
                    "not uploading %s (%.1f MiB > %.0f MiB)", rel, size / 2**20, max_file_bytes / 2**20
                )
                excludes.append(f"/{rel}")
    return excludes


def config_files(config_file: Path, sweep: bool = False) -> dict[str, str]:
    """The files to ship in ``CONFIG_DIR_IN_JOB``: the config, and for a sweep its ``base`` run config too.

    A sweep names its base relative to itself, so the base is copied alongside and ``base`` rewritten to it.
    """
    files: dict[str, str] = {}
    text = config_file.read_text()
    if sweep:
        raw = read_yaml(config_file)
        base = raw.get("base")
        if isinstance(base, str) and base:
            base_path = config_file.parent / Path(base).expanduser()
            if not base_path.is_file():
                raise InputNotFoundError(f"{config_file}: base {base}: run config not found")
            base_name = f"{config_file.stem}.base{base_path.suffix or '.yaml'}"
            files[base_name] = base_path.read_text()
            text = yaml.safe_dump({**raw, "base": base_name}, sort_keys=False)
    files[config_file.name] = text
    return files


def submission_id_for(command: str, name: str) -> str:
    """Readable, unique job id: ``gptfl-run-<name>-<UTC time>-<random>``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "job"
    return f"gptfl-{command}-{slug}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def make_job_request(
    config: str | Path,
    *,
    sweep: bool = False,
    overrides: Sequence[str] = (),
    data_dir: str | None = None,
    extra_args: str = "",
    name: str | None = None,
    project_root: Path = PROJECT_ROOT,
) -> JobRequest:
    """Describe the Ray Job for ``gptfl run`` (or ``gptfl sweep``) on ``config``."""
    config_file = Path(config).expanduser().resolve()
    if not config_file.is_file():
        raise InputNotFoundError(f"{config}: config file not found")
    if not ((project_root / "gptfl_ray").is_dir() and (project_root / "pyproject.toml").is_file()):
        # An installed (non-editable) package would make site-packages the "project": refuse to upload that.
        raise UserError(
            f"{project_root}: not a gptfl-ray source checkout (pyproject.toml + gptfl_ray/); "
            "gptfl submit uploads the checkout, so run it from one installed with `pip install -e .`"
        )
    command = "sweep" if sweep else "run"
    config_in_job = f"{CONFIG_DIR_IN_JOB}/{config_file.name}"
    return JobRequest(
        entrypoint=build_entrypoint(command, config_in_job, overrides, data_dir, extra_args),
        submission_id=submission_id_for(command, name or config_file.stem),
        working_dir=project_root,
        config_in_job=config_in_job,
        files=config_files(config_file, sweep),
        excludes=upload_excludes(project_root),
        # Unbuffered output so `--wait` and the dashboard show progress as it happens.
        env_vars={"PYTHONUNBUFFERED": "1"},
        metadata={
            "gptfl_command": command,
            "gptfl_config": str(config),
            "gptfl_name": name or config_file.stem,
            "gptfl_overrides": " ".join(overrides),
        },
    )


@contextmanager
def staged_working_dir(job: JobRequest) -> Iterator[Path]:
    """A temp dir that *is* the project root for Ray's packager, plus ``job.files`` under ``.gptfl-submit/``.

    Each top-level entry of the checkout is symlinked (Ray's zip follows links and still applies the
    checkout's .gitignore), so nothing is copied and the checkout is never written to.
    """
    stage = Path(tempfile.mkdtemp(prefix="gptfl-submit-"))
    try:
        for entry in sorted(job.working_dir.iterdir()):
            if entry.name not in SKIPPED_TOP_LEVEL and entry.name != CONFIG_DIR_IN_JOB:
                (stage / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
        (stage / CONFIG_DIR_IN_JOB).mkdir()
        for name, text in job.files.items():
            (stage / CONFIG_DIR_IN_JOB / name).write_text(text)
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# -------------------------------------------------------------------------------------- cluster
def normalize_address(address: str) -> str:
    """``http(s)://HOST:PORT`` without a trailing slash; a bare ``HOST:PORT`` gets ``http://`` only when HOST is
    loopback (elsewhere the user must choose: ``https://``, or ``http://`` with ``--insecure``)."""
    address = address.strip().rstrip("/")
    if not address:
        raise UserError("--address: empty (expected e.g. http://127.0.0.1:8265)")
    if "://" not in address:
        if not url_is_loopback(f"http://{address}"):
            raise UserError(
                f"--address {address}: give the scheme: https://{address} (or http://{address} with --insecure)"
            )
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise UserError(f"--address {address}: expected the dashboard's http(s)://HOST:PORT (e.g. port 8265)")
    return address


def check_address(address: str, insecure: bool = False) -> str:
    """The normalized dashboard URL; refuses plain http to a non-loopback host unless ``insecure``."""
    address = normalize_address(address)
    check_endpoint(
        address,
        field="--address",
        secret="the job (code, config and Ray auth token)",
        insecure=insecure,
        opt_in="pass --insecure",
    )
    return address


def connect(address: str, token: str | None, insecure: bool = False) -> JobSubmissionClient:
    """A job client for the dashboard at ``address``; unreachable or unauthorised -> one-line UserError."""
    import requests
    from ray.job_submission import JobSubmissionClient

    address = check_address(address, insecure)
    headers = auth_headers(token)
    # Probe first with a timeout: the client itself would hang on a black-holed address. Only the status is
    # used: stream=True leaves the body unread, however large.
    try:
        with requests.get(
            f"{address}/api/version", headers=headers, timeout=CONNECT_TIMEOUT_S, stream=True
        ) as probe:
            pass
    except requests.RequestException as err:
        raise UserError(
            f"cannot reach the Ray dashboard at {address} ({type(err).__name__}); is the cluster up and "
            "the port forwarded (kubectl port-forward svc/<cluster>-head-svc 8265:8265)?"
        ) from None
    if probe.status_code in (401, 403):
        have = "the token was rejected" if token else "no token found"
        raise UserError(
            f"the Ray dashboard at {address} requires token auth and {have}: set RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token to the cluster's token (see cluster/README.md)"
        )
    if probe.status_code != 200:
        raise UserError(f"{address}/api/version answered HTTP {probe.status_code}: not a Ray dashboard?")
    try:
        with _env_without("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):  # they would override --address
            return JobSubmissionClient(address, headers=headers)
    except (ConnectionError, RuntimeError) as err:
        raise UserError(f"Ray dashboard at {address}: {_first_line(err)}") from None


def submit(client: JobSubmissionClient, job: JobRequest) -> str:
    """Upload the working dir (with the config) and start the job; returns the submission id."""
    from ray.exceptions import RuntimeEnvSetupError

    with staged_working_dir(job) as stage:
        runtime_env: dict[str, Any] = {
            "working_dir": str(stage),
            "excludes": job.excludes,
            "env_vars": job.env_vars,
        }
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return client.submit_job(
                    entrypoint=job.entrypoint,
                    submission_id=job.submission_id,
                    runtime_env=runtime_env,
                    metadata=job.metadata,
                )
            except (RuntimeEnvSetupError, RuntimeError, ValueError) as err:
                # A head that has just started answers HTTP before its job agent registers ("No available
                # agent to submit job"): wait for it, as a freshly created KubeRay cluster needs.
                if "No available agent" in str(err) and time.monotonic() < deadline:
                    wait = retry_wait(1, AGENT_RETRY_S) or AGENT_RETRY_S  # constant base, jittered
                    log.info("the cluster's job agent is not up yet; retrying in %.1f s", wait)
                    time.sleep(wait)
                    continue
                raise UserError(f"job submission failed: {_first_line(err)}") from None


def follow(client: JobSubmissionClient, submission_id: str, out: TextIO = sys.stdout) -> int:
    """Stream the job's logs until it ends; return its exit status (0 = SUCCEEDED)."""
    import aiohttp
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except (RuntimeError, OSError, aiohttp.ClientError) as err:  # stream dropped: poll the status instead
        log.warning("log stream ended early (%s); polling the job status", _first_line(err))
    while not (info := client.get_job_info(submission_id)).status.is_terminal():
        time.sleep(1.0)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    print(f"job {submission_id} {info.status}: {_first_line(info.message or '')}", file=sys.stderr)
    code = info.driver_exit_code
    return code if code is not None and code > 0 else 1


def dashboard_link(address: str, submission_id: str) -> str:
    return f"{normalize_address(address)}/#/jobs/{submission_id}"


# ------------------------------------------------------------------------------------------ CLI
def submit_command(args: Any) -> int:
    """``gptfl submit CONFIG --address URL [--sweep] [--wait] [--set K=V ...] [--extra-args ...]``."""
    insecure = bool(getattr(args, "insecure", False))
    address = check_address(args.address, insecure)  # before anything is imported, read or packed
    if not getattr(args, "verbose", False):
        import ray  # noqa: F401  (configures Ray's loggers, which we then quiet)

        logging.getLogger("ray").setLevel(logging.WARNING)  # the packager logs every ignore file it reads
    cfg = getattr(
        args, "cfg", None
    )  # the validated RunConfig (None for --sweep: a sweep file is no run config)
    name = cfg.name if cfg is not None else None
    if args.sweep:  # validate the sweep and its base run config here, before anything travels
        from gptfl_ray.sweep import load_sweep

        sweep_cfg, cfg = load_sweep(args.config, args.overrides)
        name = sweep_cfg.name
    if cfg is not None and not Path(cfg.output_dir).is_absolute():
        log.warning(
            "output_dir %r is relative: the run folder will land in the job's temporary working dir on "
            "the head node; pass --set output_dir=/mnt/gptfl/runs (shared storage) to keep it",
            str(cfg.output_dir),
        )
    job = make_job_request(
        args.config,
        sweep=args.sweep,
        overrides=args.overrides,
        data_dir=args.data_dir,
        extra_args=args.extra_args,
        name=name,
    )
    token = read_auth_token(address=address)
    client = connect(address, token, insecure)
    submission_id = submit(client, job)
    ray_cli = "RAY_AUTH_MODE=token ray" if token else "ray"  # the ray CLI sends its token only in token mode
    print(f"submitted job {submission_id}: {job.entrypoint}")
    print(f"dashboard: {dashboard_link(address, submission_id)}")
    if cfg is not None:
        print(f"results: under {cfg.output_dir}/ on the cluster")
    if not args.wait:
        print(f"follow:   {ray_cli} job logs --address {address} --follow {submission_id}")
        return 0
    try:
        return follow(client, submission_id)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; job {submission_id} keeps running "
            f"(stop it: {ray_cli} job stop --address {address} {submission_id})",
            file=sys.stderr,
        )
        return 130


@contextmanager
def _env_without(*names: str) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _first_line(err: object) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
