"""Per-virtual-client state (SCAFFOLD's control variates) kept on disk, versioned by round.

With 1,000 virtual clients a control variate per client does not fit in memory for real models, and it must
survive actor deaths and interruptions. Each version is one safetensors file ``<cid>.r<round>.safetensors``;
the server tracks which version is current and which one the last checkpoint refers to:

- ``put`` writes a new version atomically (staged until the round is applied or dropped);
- ``commit_checkpoint`` makes the current versions the checkpoint's and deletes the superseded ones;
- ``restore`` (on resume) returns to the checkpoint's versions and deletes anything newer.

A plain file per client is used rather than Ray's object store: the state must outlive the Ray session.
The OS page cache keeps recently used files in memory, so there is no separate cache here.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gptfl_ray.errors import InputNotFoundError
from gptfl_ray.io import load_weights, save_weights

_NAME = re.compile(r"^(\d+)\.r(\d+)\.safetensors$")


class ClientStateStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.current: dict[int, int] = {}  # cid -> round of its newest applied version
        self.committed: dict[int, int] = {}  # cid -> round of the version the last checkpoint uses
        self.staged: dict[int, int] = {}  # cid -> round, written this round, not applied yet

    def _path(self, cid: int, rnd: int) -> Path:
        return self.root / f"{cid}.r{rnd}.safetensors"

    def get(self, cid: int) -> dict[str, torch.Tensor] | None:
        rnd = self.current.get(cid)
        return None if rnd is None else load_weights(self._path(cid, rnd))

    def put(self, cid: int, rnd: int, tensors: dict[str, torch.Tensor]) -> None:
        save_weights(self._path(cid, rnd), tensors)
        self.staged[cid] = rnd

    def apply_round(self) -> None:
        """The round's staged versions become current; the versions they replace go unless checkpointed."""
        for cid, rnd in self.staged.items():
            old = self.current.get(cid)
            if old is not None and old != rnd and old != self.committed.get(cid):
                self._path(cid, old).unlink(missing_ok=True)
            self.current[cid] = rnd
        self.staged.clear()

    def drop_round(self) -> None:
        for cid, rnd in self.staged.items():
            if rnd != self.current.get(cid) and rnd != self.committed.get(cid):
                self._path(cid, rnd).unlink(missing_ok=True)
        self.staged.clear()

    def commit_checkpoint(self) -> None:
        for cid, rnd in self.committed.items():
            if self.current.get(cid) != rnd:
                self._path(cid, rnd).unlink(missing_ok=True)
        self.committed = dict(self.current)

    def index(self) -> dict[str, int]:
        """The current versions, for the checkpoint (JSON keys are strings)."""
        return {str(c): r for c, r in sorted(self.current.items())}

    def restore(self, index: dict[str, int]) -> None:
        """Return to a checkpoint's versions; files of rounds after it (an interrupted run) are deleted."""
        self.current = {int(c): int(r) for c, r in index.items()}
        self.committed = dict(self.current)
        self.staged.clear()
        for f in self.root.iterdir():
            m = _NAME.match(f.name)
            if m and self.current.get(int(m.group(1))) != int(m.group(2)):
                f.unlink(missing_ok=True)
        missing = [c for c, r in self.current.items() if not self._path(c, r).is_file()]
        if missing:
            raise InputNotFoundError(f"{self.root}: client state of clients {missing[:5]} missing for resume")

    def clear(self) -> None:
        self.restore({})
