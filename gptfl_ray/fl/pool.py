"""A fixed pool of client actors with dynamic dispatch and fault handling.

Tasks go to whichever actor is free (one task in flight per actor, so the round's tail stays short) and
results are yielded as they complete. An actor that dies (``ray.kill``, node loss, OOM kill) is replaced
by a fresh one and its task is re-dispatched up to ``retries`` times; after that the task is reported as
failed and the caller decides (aggregate the survivors). Errors raised *by our code* inside a task are not
retried: they propagate, so a bug never turns into silently missing updates.

Ray's own actor restarts (``max_restarts``) are not used because they retry a task on the same actor
handle without telling the server; here every death is visible, logged and counted.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorAlreadyExistsError, ActorUnavailableError, RayActorError

from gptfl_ray.fl.client import ClientSpec, FLClient

log = logging.getLogger(__name__)

ACTOR_FAILURES = (RayActorError, ActorUnavailableError)


def actor_namespace(out_dir: Path) -> str:
    """Ray namespace of a run's actors: concurrent runs (e.g. Tune trials) each get their own."""
    return "gptfl-fl-" + hashlib.sha1(str(Path(out_dir).resolve()).encode()).hexdigest()[:10]


@dataclass
class Task:
    key: Any  # caller's id of the task (e.g. position in the round)
    method: str  # FLClient method
    args: tuple
    client: int | None = None  # virtual client id, for logs
    dispatches: int = 0


@dataclass
class Outcome:
    task: Task
    value: Any = None
    error: str | None = None  # set when the task's actors died more than ``retries`` + 1 times
    actor: Any = None  # handle of the actor that produced ``value`` (it may keep state for the task)


class ClientPool:
    def __init__(
        self,
        spec: ClientSpec,
        size: int,
        *,
        num_cpus: float,
        num_gpus: float,
        namespace: str,
        max_replacements: int,
        actor_cls: type[FLClient] = FLClient,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.spec = spec
        self.namespace = namespace
        self.max_replacements = max_replacements
        self.replacements = 0
        self.on_event = on_event or (lambda e: None)
        self._remote_cls = ray.remote(actor_cls)
        self._options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": 0}
        self.actors = [self._start(slot, f"fl-client-{slot}") for slot in range(size)]

    def _start(self, slot: int, name: str):
        # A resumed run reuses its namespace; the previous attempt's actors release their names
        # asynchronously after ray.kill, so wait briefly for a name, then fall back to a suffixed one.
        for attempt in range(50):
            candidate = name if attempt < 49 else f"{name}-{uuid.uuid4().hex[:6]}"
            try:
                opts = self._remote_cls.options(name=candidate, namespace=self.namespace, **self._options)
                return opts.remote(self.spec)
            except ActorAlreadyExistsError:
                time.sleep(0.1)
        raise RuntimeError(f"could not start client actor {name}")

    def _replace(self, slot: int, err: BaseException) -> None:
        self.replacements += 1
        if self.replacements > self.max_replacements:
            raise RuntimeError(
                f"{self.replacements} client actors died (fl.max_actor_replacements={self.max_replacements}); "
                f"last error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            )
        ray.kill(self.actors[slot], no_restart=True)  # no-op when already dead
        name = f"fl-client-{slot}-r{self.replacements}"
        self.actors[slot] = self._start(slot, name)
        log.warning("client actor in slot %d died (%s); replaced by %s", slot, type(err).__name__, name)

    def run(self, tasks: list[Task], retries: int) -> Iterator[Outcome]:
        """Run ``tasks`` on the pool; yield each outcome as it completes (completion order)."""
        queue = deque(tasks)
        in_flight: dict[ray.ObjectRef, tuple[int, Task]] = {}
        idle = deque(range(len(self.actors)))
        while queue or in_flight:
            while queue and idle:
                slot, task = idle.popleft(), queue.popleft()
                task.dispatches += 1
                ref = getattr(self.actors[slot], task.method).remote(*task.args)
                in_flight[ref] = (slot, task)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                slot, task = in_flight.pop(ref)
                try:
                    value = ray.get(ref)
                except ACTOR_FAILURES as err:
                    self.on_event(
                        {
                            "event": "actor_died",
                            "slot": slot,
                            "client": task.client,
                            "task": task.method,
                            "error": type(err).__name__,
                            "dispatches": task.dispatches,
                        }
                    )
                    self._replace(slot, err)
                    idle.append(slot)
                    if task.dispatches <= retries:
                        queue.appendleft(task)
                    else:
                        yield Outcome(task, error=f"actor died ({type(err).__name__})")
                    continue
                idle.append(slot)
                yield Outcome(task, value, actor=self.actors[slot])

    def replace_dead(self, timeout_s: float | None = None) -> list[int]:
        """Ping every actor; replace those that died outside :meth:`run` (e.g. during secure aggregation)
        or do not answer within ``timeout_s``. Returns the replaced slots."""
        refs = [a.info.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        replaced = []
        for slot, ref in enumerate(refs):
            error: BaseException | None = TimeoutError(f"no answer within {timeout_s} s")
            if ref in ready:
                try:
                    ray.get(ref)
                    error = None
                except ACTOR_FAILURES as err:
                    error = err
            if error is None:
                continue
            self.on_event(
                {
                    "event": "actor_died",
                    "slot": slot,
                    "client": None,
                    "task": "ping",
                    "error": type(error).__name__,
                }
            )
            self._replace(slot, error)
            replaced.append(slot)
        return replaced

    def call_all(self, method: str, *args: Any) -> list[Any]:
        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def wait_ready(self) -> list[dict[str, Any]]:
        """Block until every actor has built its model (so round 1's time is not actor start-up)."""
        infos = self.call_all("info")
        for slot, info in enumerate(infos):
            log.info(
                "fl-client-%d: pid %s on %s, %s torch threads",
                slot,
                info["pid"],
                info["device"],
                info["torch_threads"],
            )
        return infos

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
