"""A quiet console: our own progress lines (one per generation shard, pretraining epoch and FL round, with ETA),
warnings and the dashboard URL; Ray's own logs (worker output, Ray Train checkpoint/report lines, Ray Data
progress blocks, deprecation notices) stay in the Ray session's log files. ``-v`` restores them.

``set_verbose`` is called once by the CLI; ``ray_init_kwargs`` and ``quiet_ray`` are applied where Ray starts.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("gptfl_ray.pretrain")

VERBOSE_ENV = "GPTFL_VERBOSE"


_verbose: bool | None = None  # set by the CLI; None: $GPTFL_VERBOSE, else Ray's own behaviour (verbose)


def set_verbose(verbose: bool) -> None:
    """Record the console mode of this process (the CLI's ``-v``)."""
    global _verbose
    _verbose = verbose


def verbose() -> bool:
    """Whether Ray's own logs go to the console (``-v``); library callers default to Ray's behaviour."""
    if _verbose is not None:
        return _verbose
    return os.environ.get(VERBOSE_ENV, "1") != "0"


def ray_init_kwargs() -> dict[str, Any]:
    """Extra ``ray.init`` arguments: workers' output is streamed to the console only when verbose."""
    return {} if verbose() else {"log_to_driver": False}


def quiet_ray(data: bool = True) -> None:
    """After ``ray.init``: no Ray Data progress blocks or execution banners on the console (they stay in the
    session's ray-data.log), Ray's INFO chatter off the console. No-op when verbose. ``data=False``: the caller
    uses no Ray Data, so it is not imported for its settings (a second of start-up) unless it already is."""
    if verbose():
        return
    for name in ("ray", "ray.train", "ray.tune", "ray.air"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not data and "ray.data" not in sys.modules:
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:  # the console one; its file handler keeps all
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.ERROR)


def progress(label: str, done: int, total: int) -> dict[str, Any]:
    """``extra=`` for a progress log line (``log.info(..., extra=progress("FL rounds", 3, 50))``): on a
    terminal the line also moves a bar for ``label``; elsewhere it is a plain log line."""
    return {"progress": (label, int(done), int(total))}


class TerminalProgressHandler(logging.StreamHandler):
    """Log lines print as usual, above one live tqdm bar per kind of progress (FL rounds, generation shards,
    pretraining epochs) that the lines carrying ``extra=progress(...)`` advance. For terminals only: a log file
    or pipe gets the plain lines (see :func:`log_handler`)."""

    def __init__(self, stream: Any = None):
        super().__init__(stream if stream is not None else sys.stderr)
        self.bars: dict[str, Any] = {}

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            with self.lock:  # type: ignore[union-attr]  # the epoch-progress thread logs too
                tqdm.write(self.format(record), file=self.stream)  # clears and redraws the open bars
                if getattr(record, "progress", None):
                    self._advance(tqdm, *record.progress)
        except Exception:
            self.handleError(record)

    def _advance(self, tqdm: Any, label: str, done: int, total: int) -> None:
        bar = self.bars.get(label)
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = self.bars[label] = tqdm(
                total=total, desc=label, file=self.stream, leave=False, dynamic_ncols=True, unit=""
            )
        bar.n = min(done, total)
        bar.refresh()
        if done >= total:
            bar.close()
            del self.bars[label]


def log_handler(stream: Any = None) -> logging.Handler:
    """The console's log handler: progress bars on a terminal, plain lines otherwise."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return TerminalProgressHandler(stream) if isatty and isatty() else logging.StreamHandler(stream)


def eta(done: int, total: int, elapsed: float) -> str:
    """'ETA 1m05s' from the mean time per finished unit (empty when nothing is finished yet)."""
    if done <= 0 or total <= done:
        return "done" if total <= done else ""
    left = round(elapsed / done * (total - done))
    return f"ETA {left // 60}m{left % 60:02d}s" if left >= 60 else f"ETA {left}s"


@contextmanager
def epoch_progress(out_dir: Path, epochs: int, history_file: str = "history.json") -> Iterator[None]:
    """One log line per finished pretraining epoch, read on the driver from the checkpoints Ray Train writes to
    ``out_dir/ray_train`` (the training workers' own output stays in the session logs)."""
    from gptfl_ray.io import read_json

    root = Path(out_dir) / "ray_train"
    stop = threading.Event()
    state = {"last": None, "t0": time.perf_counter(), "first": None}

    def checkpoints() -> list[Path]:  # not Ray Train's checkpoint_manager_snapshot.json beside them
        return sorted(p for p in root.glob("checkpoint_*") if p.is_dir())

    def poll() -> None:
        try:
            ckpts = checkpoints()
            if not ckpts:
                return
            history = read_json(ckpts[-1] / history_file)
        except Exception:  # a checkpoint being written or rotated: next poll
            return
        for h in history:
            epoch = int(h.get("epoch", -1))
            if state["last"] is not None and epoch <= state["last"]:
                continue
            if state["first"] is None:
                state["first"] = epoch  # a resumed run starts past epoch 0
            state["last"] = epoch
            done = epoch - state["first"] + 1
            val = f", val acc {h['val_accuracy']:.4f}" if h.get("val_accuracy") is not None else ""
            elapsed = time.perf_counter() - state["t0"]
            log.info(
                "pretrain epoch %d/%d: train loss %.4f%s | %.1f s %s",
                epoch + 1,
                epochs,
                h.get("train_loss", float("nan")),
                val,
                elapsed,
                eta(done, epochs - state["first"], elapsed),
                extra=progress("pretraining epochs", epoch + 1, epochs),
            )

    def loop() -> None:
        while not stop.wait(1.0):
            poll()

    # epochs finished by an earlier invocation are not repeated
    try:
        ckpts = checkpoints()
        if ckpts:
            state["last"] = max(int(h["epoch"]) for h in read_json(ckpts[-1] / history_file))
    except Exception:
        pass
    thread = threading.Thread(target=loop, name="gptfl-epoch-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        poll()


__all__ = [
    "TerminalProgressHandler",
    "epoch_progress",
    "eta",
    "log_handler",
    "progress",
    "quiet_ray",
    "ray_init_kwargs",
    "set_verbose",
    "verbose",
]
