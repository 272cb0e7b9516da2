"""Shared fixtures: the real-data directory and one private Ray instance per test session."""

from __future__ import annotations

import os
import shutil
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
