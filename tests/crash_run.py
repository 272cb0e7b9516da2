"""`python tests/crash_run.py EPOCH CONSOLE_FILE gptfl-args...`: run the gptfl CLI and SIGKILL its whole process
group once pretraining epoch EPOCH's checkpoint is registered and the console (CONSOLE_FILE, where the caller sends
this process's output) shows that epoch's line — a machine lost mid-run, at a deterministic point."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import ray.train

import gptfl_ray.pretrain as pretrain_mod
from gptfl_ray.cli import main


def kill_after_epoch(epoch: int, console: Path) -> None:
    pgid = os.getpgid(0)

    class KillAfter(ray.train.UserCallback):  # defined here: pickled by value into the Train controller
        def after_report(self, run_context, metrics, checkpoint):
            if metrics[0]["epoch"] != epoch:
                return
            line = f"pretrain epoch {epoch + 1}/"
            deadline = time.monotonic() + 180  # normally instant: a bound for an overloaded box
            while line not in console.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            os.killpg(pgid, signal.SIGKILL)
            # On a cluster the driver connected to, this controller outlives it until Ray reaps the job:
            # hold it here, so it registers no later checkpoint.
            time.sleep(600)

    real_fit = pretrain_mod.fit

    def fit(*args, **kwargs):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), KillAfter()]
        return real_fit(*args, **kwargs)

    pretrain_mod.fit = fit


if __name__ == "__main__":
    kill_after_epoch(int(sys.argv[1]), Path(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
