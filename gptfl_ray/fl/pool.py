"""A fixed pool of client actors with dynamic dispatch and fault handling.

Tasks go to whichever actor is free (one task in flight per actor, so the round's tail stays short) and
results are yielded as they complete. An actor that dies (``ray.kill``, node loss, OOM kill) or hangs (its
task runs past its deadline, see :class:`TaskDeadlines`) is killed and replaced by a fresh one, and its task
is re-dispatched up to ``retries`` times; after that the task is reported as failed and the caller decides
(aggregate the survivors). Errors raised *by our code* inside a task are not retried: they propagate, so a
bug never turns into silently missing updates. No wait here is without a deadline.

Ray's own actor restarts (``max_restarts``) are not used because they retry a task on the same actor
handle without telling the server; here every death is visible, logged and counted.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorAlreadyExistsError, ActorUnavailableError, GetTimeoutError, RayActorError

from gptfl_ray.fl.client import ClientSpec, FLClient

log = logging.getLogger(__name__)

ACTOR_FAILURES = (RayActorError, ActorUnavailableError)
START_TIMEOUT_S = 600.0  # an actor (first or replacement) must answer its first call within this
PING_TIMEOUT_S = 60.0  # an idle actor answers a ping at once; one that does not is hung


class TaskTimeoutError(TimeoutError):
    """A task ran past its deadline: its actor is treated as lost (killed and replaced)."""


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
    cost: float = 1.0  # relative size of the task (e.g. the client's sample count): scales its deadline


@dataclass
class Outcome:
    task: Task
    value: Any = None
    error: str | None = None  # set when the task's actors died more than ``retries`` + 1 times
    actor: Any = None  # handle of the actor that produced ``value`` (it may keep state for the task)


class TaskDeadlines:
    """How long a task may run before its actor counts as hung.

    ``fixed_s`` when set; otherwise ``factor`` x the median measured seconds per unit of cost of the same
    kind of task (``Task.method``) x the task's cost, at least ``min_s``, and ``unmeasured_s`` until a task
    of that kind has finished. Deadlines are re-evaluated while tasks run, so the first finisher of a
    round tightens the deadline of the others.
    """

    def __init__(
        self,
        fixed_s: float | None = None,
        *,
        factor: float = 10.0,
        min_s: float = 60.0,
        unmeasured_s: float = 600.0,
        window: int = 256,
    ):
        self.fixed_s, self.factor, self.min_s, self.unmeasured_s = fixed_s, factor, min_s, unmeasured_s
        self.window = window
        self._rates: dict[str, deque[float]] = {}

    def record(self, method: str, seconds: float, cost: float = 1.0) -> None:
        rates = self._rates.setdefault(method, deque(maxlen=self.window))
        rates.append(seconds / max(cost, 1e-9))

    def seconds(self, method: str, cost: float = 1.0) -> float:
        if self.fixed_s is not None:
            return self.fixed_s
        rates = self._rates.get(method)
        if not rates:
            return self.unmeasured_s
        return max(self.min_s, self.factor * statistics.median(rates) * cost)


@dataclass
class _Running:
    slot: int
    task: Task
    started: float  # time.monotonic() at dispatch


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
        deadlines: TaskDeadlines | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ):
        self.spec = spec
        self.namespace = namespace
        self.max_replacements = max_replacements
        self.replacements = 0
        self.on_event = on_event or (lambda e: None)
        self.deadlines = deadlines or TaskDeadlines()
        self.start_timeout_s = start_timeout_s
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
        """Kill the actor in ``slot`` (dead or hung) and start a fresh one; returns once it answers."""
        while True:
            self.replacements += 1
            if self.replacements > self.max_replacements:
                raise RuntimeError(
                    f"{self.replacements} client actors died or hung "
                    f"(fl.max_actor_replacements={self.max_replacements}); "
                    f"last error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                )
            ray.kill(self.actors[slot], no_restart=True)  # no-op when already dead; ends a hung task
            name = f"fl-client-{slot}-r{self.replacements}"
            self.actors[slot] = self._start(slot, name)
            what = "hung" if isinstance(err, TimeoutError) else "died"
            log.warning(
                "client actor in slot %d %s (%s); replaced by %s", slot, what, type(err).__name__, name
            )
            # Wait for the new actor here, so its start-up never counts against a task's deadline.
            try:
                ray.get(self.actors[slot].info.remote(), timeout=self.start_timeout_s)
                return
            except (GetTimeoutError, *ACTOR_FAILURES) as start_err:
                err = start_err
                self.on_event(
                    {"event": "actor_start_failed", "slot": slot, "actor": name, "error": type(err).__name__}
                )

    def _lost(
        self, run: _Running, err: BaseException, retries: int, queue: deque[Task], idle: deque[int]
    ) -> Outcome | None:
        """A task whose actor died or hung: log it, replace the actor, re-queue the task or give it up."""
        task = run.task
        event = {
            "event": "task_timeout" if isinstance(err, TaskTimeoutError) else "actor_died",
            "slot": run.slot,
            "client": task.client,
            "task": task.method,
            "error": type(err).__name__,
            "dispatches": task.dispatches,
        }
        if isinstance(err, TaskTimeoutError):
            event["seconds"] = round(time.monotonic() - run.started, 3)
        self.on_event(event)
        self._replace(run.slot, err)
        idle.append(run.slot)
        if task.dispatches <= retries:
            queue.appendleft(task)
            return None
        what = "timed out" if isinstance(err, TaskTimeoutError) else "died"
        return Outcome(task, error=f"actor {what} ({type(err).__name__})")

    def _deadline(self, run: _Running) -> float:
        return run.started + self.deadlines.seconds(run.task.method, run.task.cost)

    def run(self, tasks: list[Task], retries: int) -> Iterator[Outcome]:
        """Run ``tasks`` on the pool; yield each outcome as it completes (completion order)."""
        queue = deque(tasks)
        in_flight: dict[ray.ObjectRef, _Running] = {}
        idle = deque(range(len(self.actors)))
        while queue or in_flight:
            while queue and idle:
                slot, task = idle.popleft(), queue.popleft()
                task.dispatches += 1
                ref = getattr(self.actors[slot], task.method).remote(*task.args)
                in_flight[ref] = _Running(slot, task, time.monotonic())
            wait_s = min(self._deadline(r) for r in in_flight.values()) - time.monotonic()
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=max(0.0, wait_s))
            for ref in ready:
                run = in_flight.pop(ref)
                try:
                    value = ray.get(ref)
                except ACTOR_FAILURES as err:
                    outcome = self._lost(run, err, retries, queue, idle)
                    if outcome is not None:
                        yield outcome
                    continue
                self.deadlines.record(run.task.method, time.monotonic() - run.started, run.task.cost)
                idle.append(run.slot)
                yield Outcome(run.task, value, actor=self.actors[run.slot])
            now = time.monotonic()
            overdue = [ref for ref, run in in_flight.items() if self._deadline(run) <= now]
            if overdue:  # those that finished while the caller held us count as finished, not hung
                _, overdue = ray.wait(overdue, num_returns=len(overdue), timeout=0)
            for ref in overdue:
                run = in_flight.pop(ref)
                limit = self.deadlines.seconds(run.task.method, run.task.cost)
                err = TaskTimeoutError(f"{run.task.method} ran past its {limit:.3g} s deadline")
                outcome = self._lost(run, err, retries, queue, idle)
                if outcome is not None:
                    yield outcome

    def replace_dead(self, timeout_s: float = PING_TIMEOUT_S) -> list[int]:
        """Ping every actor; replace those that died outside :meth:`run` (e.g. during secure aggregation)
        or do not answer within ``timeout_s`` (hung). Returns the replaced slots."""
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
                    "event": "actor_hung" if isinstance(error, TimeoutError) else "actor_died",
                    "slot": slot,
                    "client": None,
                    "task": "ping",
                    "error": type(error).__name__,
                }
            )
            self._replace(slot, error)
            replaced.append(slot)
        return replaced

    def call_all(self, method: str, *args: Any, timeout_s: float | None = None) -> list[Any]:
        """``method`` on every actor; ``GetTimeoutError`` after ``timeout_s`` (default: the start timeout)."""
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        return ray.get(refs, timeout=self.start_timeout_s if timeout_s is None else timeout_s)

    def wait_ready(self) -> list[dict[str, Any]]:
        """Block until every actor has built its model (so round 1's time is not actor start-up)."""
        try:
            infos = self.call_all("info")
        except GetTimeoutError:
            raise RuntimeError(
                f"client actors not ready after {self.start_timeout_s:g} s "
                "(is the cluster short of the CPUs/GPUs fl.actor_num_cpus/actor_num_gpus ask for?)"
            ) from None
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
