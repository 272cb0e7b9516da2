"""Reading the CLI's stderr in tests: log records (progress) are allowed, the error itself must be one line."""

from __future__ import annotations

import re

LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) \S+: ")


def error_lines(stderr: str) -> list[str]:
    """The lines of `stderr` that are not log records; a clean CLI failure leaves exactly one."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.strip().splitlines() if not LOG_RECORD.match(line)]
