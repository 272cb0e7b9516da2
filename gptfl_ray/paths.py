"""Where datasets live (config ``data_dir``, ``--data-dir``, ``$GPTFL_DATA_DIR``); the derived-data cache."""

from __future__ import annotations

import os
from pathlib import Path

from gptfl_ray.errors import InputNotFoundError

ENV_VAR = "GPTFL_DATA_DIR"


class DataNotFoundError(InputNotFoundError):
    """A dataset file is missing; the message says which files to put where."""


def data_dir(explicit: str | Path | None = None) -> Path:
    """Resolve the data directory (explicit argument first, then ``$GPTFL_DATA_DIR``)."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    raise DataNotFoundError(
        f"no data directory: set data_dir in the config, pass --data-dir, or export {ENV_VAR}=/path/to/data"
    )


CACHE_ENV_VAR = "GPTFL_CACHE_DIR"


def cache_dir() -> Path:
    """Where derived data (decoded audio clips) is cached: ``$GPTFL_CACHE_DIR``, else the XDG user cache."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gptfl-ray"
