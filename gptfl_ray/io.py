"""Durable atomic file writes (temp file in the same directory, fsync, ``os.replace``, fsync of the directory)
and small JSON / safetensors helpers.

Every artifact a step produces goes through here, so neither an interrupted step nor a power loss leaves a
half-written or empty file that a resumed run would trust: when a writer returns, the file's data and its name
are both on disk.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gptfl_ray.errors import InputError, InputNotFoundError


class CorruptFileError(InputError):
    """An artifact that exists but cannot be read (empty, truncated, wrong format); the message names the file.

    A user error (``gptfl_ray.errors.InputError``, a ``ValueError``): the CLI prints it as one line, exit 2."""


def fsync_file(path: str | Path) -> None:
    """Flush a closed file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make the entries of directory ``path`` (creations, renames, deletions) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | Path) -> None:
    """``mkdir -p`` whose new directories survive a power loss (each new one's parent is fsynced)."""
    path = Path(path)
    if path.is_dir():
        return
    make_dirs(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise
        return  # made concurrently by another writer, which syncs it
    fsync_dir(path.parent)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it is fsynced, renamed onto ``path`` and the directory
    fsynced (so the new name cannot survive a crash without its data), else removed."""
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; artifacts on shared storage must be readable by others
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path}: not a readable JSON file ({err})") from None


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line (flushed); a torn last line is skipped by ``read_jsonl``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")
        f.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # torn write from an interrupted run
    return out


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in records))


def save_weights(path: str | Path, state: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Atomically write a torch state dict as safetensors."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_weights(path: str | Path) -> dict[str, Any]:
    """A safetensors file as a state dict; an unreadable file is a one-line :class:`CorruptFileError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptFileError(f"{path}: {_weights_problem(path, err)}") from None


def check_weights(path: str | Path) -> None:
    """Fail fast (before any work) on a weights file that :func:`load_weights` could not read: checks the
    safetensors header and that the file holds every byte the header promises."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptFileError(f"{path}: {_weights_problem(path, err)}") from None


def _weights_problem(path: Path, err: BaseException) -> str:
    size = path.stat().st_size
    if size == 0:
        return "weights file is empty (0 bytes: a write cut short by a crash?)"
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"not a readable safetensors file ({size} bytes: {first})"


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
