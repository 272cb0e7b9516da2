"""Tests that run a CLI command as its own driver on the session's Ray instance, then SIGKILL it."""

from __future__ import annotations

import time


def wait_for_released_cpus(timeout_s: float = 120.0) -> None:
    """Block until every CPU of the session's Ray instance is free again: a killed driver's actors (a CLI run
    that the test SIGKILLed while connected to this instance) are gone, so none still writes into its folders."""
    import ray

    deadline = time.monotonic() + timeout_s
    total = ray.cluster_resources().get("CPU", 0)
    while ray.available_resources().get("CPU", 0) < total:
        assert time.monotonic() < deadline, f"CPUs still held {timeout_s:g} s after the kill"
        time.sleep(0.2)
