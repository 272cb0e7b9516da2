"""The quiet console's progress bars: on a terminal, progress lines move a live bar; elsewhere plain lines."""

from __future__ import annotations

import io
import logging

from gptfl_ray.console import TerminalProgressHandler, log_handler, progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger("gptfl_ray.test_console")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_progress_lines_move_a_bar_on_a_terminal_and_stay_plain_elsewhere():
    term = FakeTerminal()
    handler = log_handler(term)
    assert isinstance(handler, TerminalProgressHandler)
    log = _logger(handler)
    log.info("round 1/4: 10 updates", extra=progress("FL rounds", 1, 4))
    log.info("round 2/4: 10 updates", extra=progress("FL rounds", 2, 4))
    assert "FL rounds" in handler.bars and handler.bars["FL rounds"].n == 2
    log.warning("a warning without progress")
    log.info("round 4/4: 10 updates", extra=progress("FL rounds", 4, 4))
    out = term.getvalue()
    assert "round 1/4: 10 updates" in out and "a warning without progress" in out
    assert "FL rounds:" in out and "2/4" in out  # the bar was drawn
    assert handler.bars == {}  # closed when done

    pipe = io.StringIO()  # a log file or a pipe: no bar, the same lines
    handler = log_handler(pipe)
    assert not isinstance(handler, TerminalProgressHandler)
    log = _logger(handler)
    log.info("round 1/4: 10 updates", extra=progress("FL rounds", 1, 4))
    assert pipe.getvalue() == "round 1/4: 10 updates\n"


def test_round_line_shows_the_target_f1_and_moves_the_round_bar():
    from gptfl_ray.fl.runner import _log_round

    term = FakeTerminal()
    handler = TerminalProgressHandler(term)
    logger = logging.getLogger("gptfl_ray.fl.runner")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        rec = {"round": 3, "accuracy": 0.5, "weighted_f1": 0.4321, "loss": 1.0, "num_updates": 10}
        rec |= {"rejected": [], "failed_clients": [], "skipped": False, "wall_time_s": 1.0, "cum_mb": 2.0}
        _log_round(rec, 20, "weighted_f1")
        _log_round({**rec, "round": 4}, 20)  # accuracy runs: no F1 on the line
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = term.getvalue()
    assert "round 3/20: acc 0.5000 wF1 0.4321 loss 1.0000 |" in lines
    assert "round 4/20: acc 0.5000 loss 1.0000 |" in lines
    assert handler.bars["FL rounds"].n == 4
