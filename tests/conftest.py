"""Shared fixtures: the real-data directory and one private Ray instance per test session."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path | None:
    env = os.environ.get("GPTFL_DATA_DIR")
    if env:
        return Path(env)
    shared = REPO.parent / "shared" / "data"
    return shared if shared.is_dir() else None


DATA_DIR = _data_dir()
if DATA_DIR is not None:
    os.environ["GPTFL_DATA_DIR"] = str(DATA_DIR)
# Decoded audio is cached for this session only (subprocesses and Ray workers inherit it), never in ~/.cache.
CACHE_DIR = tempfile.mkdtemp(prefix="gptfl-cache-")
os.environ["GPTFL_CACHE_DIR"] = CACHE_DIR
# Ray Train's controller polls its workers every 2 s: a tiny test pretraining is noticed finished up to 2 s (more
# on a busy box) after its last epoch, and the suite runs many. Inherited by the Train controllers of this
# session's Ray and of the CLI subprocesses' own.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Each Ray Train fit also starts a preemption watcher (one more worker process) that polls for node drains, which
# a single-node test session never sees; the product keeps Ray's default.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _is_loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if not isinstance(host, str):  # AF_UNIX paths are bytes or str without a dot-quad: local either way
        return True
    if host in ("localhost", "") or "/" in host:
        return True
    if host in _OWN_ADDRESSES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _own_addresses() -> set[str]:
    """This machine's own interface addresses (Ray may announce the node by one of them)."""
    out = set()
    with contextlib.suppress(OSError):
        out.update(socket.gethostbyname_ex(socket.gethostname())[2])
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # a UDP connect sends nothing: it only picks the outgoing interface
        out.add(s.getsockname()[0])
    return out


_OWN_ADDRESSES = _own_addresses()


_real_connect, _real_connect_ex = socket.socket.connect, socket.socket.connect_ex


def _guarded(real):
    """Tests talk to this machine only: a TCP connection anywhere else fails loudly instead of leaving it."""

    def connect(sock, address):
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
        if tcp and not _is_loopback(address):
            raise ConnectionRefusedError(f"test guard: no connections off this machine ({address!r})")
        return real(sock, address)

    return connect


socket.socket.connect = _guarded(_real_connect)
socket.socket.connect_ex = _guarded(_real_connect_ex)


def pytest_unconfigure(config):
    shutil.rmtree(CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if DATA_DIR is None or not (DATA_DIR / "mnist").is_dir():
        pytest.fail("real test data not found: set GPTFL_DATA_DIR or place it in ../shared/data")
    return DATA_DIR


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance with its own temp dir (parallel sessions on one machine must not collide)."""
    import ray

    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ["RAY_TMPDIR"] = tmp
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=tmp,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {k: os.environ.get(k, "") for k in ("GPTFL_DATA_DIR", "GPTFL_CACHE_DIR")}},
    )
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def one_torch_thread():
    """Small CPU ops (server-side distillation steps, unrolled graphs) run 20-50× slower with 2 torch threads on a
    busy 2-core box; restored afterwards."""
    from gptfl_ray.training import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, ray_session, data_dir):
    """One finished `gptfl run configs/smoke.yaml` (MLflow tracking on, its default), shared by the tests that read
    its artifacts and MLflow store, rerun it, or compare a resumed pretraining with its uninterrupted one:
    (config, run folder, `run`'s result)."""
    from gptfl_ray.config import load_config
    from gptfl_ray.run import run

    run_dir = tmp_path_factory.mktemp("smoke-run") / "smoke"
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    return cfg, run_dir, run(cfg, run_dir)
