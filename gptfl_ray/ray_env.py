"""Connecting to Ray: reuse the running instance, else start a local one / connect to ``ray_address``; user code
that travels to the workers by value."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def ensure_ray(address: str | None = None, *, announce: bool = False, data: bool = True) -> Any | None:
    """Initialise Ray unless it already is; returns the new context when this call started it, else None.

    Without ``-v`` (``gptfl_ray.console``) the workers' output and Ray's own progress logs stay in the session's
    log files. ``announce``: print the dashboard URL when this call started Ray. ``data=False``: the caller
    runs no Ray Data (FL): its console settings are not loaded (see ``console.quiet_ray``)."""
    import ray

    from gptfl_ray.console import quiet_ray, ray_init_kwargs

    if ray.is_initialized():
        return None
    ctx = ray.init(address=address, configure_logging=False, **ray_init_kwargs())
    quiet_ray(data=data)
    if announce:
        url = getattr(ctx, "dashboard_url", None)
        print(f"Ray dashboard: http://{url}" if url else "Ray dashboard: not running", flush=True)
    return ctx


@contextmanager
def ray_for(address: str | None = None, *, announce: bool = False) -> Iterator[None]:
    """Ray for the duration of a command; shut down afterwards only if this call started it."""
    import ray

    ctx = ensure_ray(address, announce=announce)
    try:
        yield
    finally:
        if ctx is not None:
            ray.shutdown()


def ship_by_value(module_name: str) -> None:
    """Pickle the user's (imported) module ``module_name`` by value, so what it defines (a ``module:callable``
    model, ``module:function`` dataset, ``module:Class`` strategy) reaches Ray workers that cannot import it;
    this package's own modules are importable everywhere and stay pickled by reference."""
    if not module_name.startswith("gptfl_ray."):
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[module_name])
