"""The project's user-error types: what the ``gptfl`` command shows as one line (exit 2).

Anything else that escapes a command is a bug and is shown with its traceback. Each type also derives from the
built-in it replaces (``ValueError``, ``FileNotFoundError``), so callers that catch those keep working.
This module imports nothing from the project (every module may import it).
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input (config, command line, input files); shown as one line, exit 2."""


class ConfigError(UserError, ValueError):
    """A config problem; the message names the file and the field."""


class InputError(UserError, ValueError):
    """A file or folder given as input exists but is not what the command needs (wrong format, wrong run)."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder given as input (or a dataset file) does not exist."""


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to at most ``limit`` characters (``…`` marks the cut): echoed input stays bounded."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


__all__ = ["ConfigError", "InputError", "InputNotFoundError", "UserError", "shorten"]
