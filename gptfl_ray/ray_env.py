"""Connecting to Ray: reuse the running instance, else start a local one / connect to ``ray_address``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def ensure_ray(address: str | None = None) -> Any | None:
    """Initialise Ray unless it already is; returns the new context when this call started it, else None."""
    import ray

    if ray.is_initialized():
        return None
    return ray.init(address=address, configure_logging=False)


@contextmanager
def ray_for(address: str | None = None, *, announce: bool = False) -> Iterator[None]:
    """Ray for the duration of a command; shut down afterwards only if this call started it."""
    import ray

    ctx = ensure_ray(address)
    if announce and ctx is not None:
        url = getattr(ctx, "dashboard_url", None)
        print(f"Ray dashboard: http://{url}" if url else "Ray dashboard: not running", flush=True)
    try:
        yield
    finally:
        if ctx is not None:
            ray.shutdown()
