"""A fixed pool of client actors with dynamic dispatch and fault handling.

Tasks wait in one queue and go to the actors as they free up; each actor keeps one more task queued behind
the running one (Ray runs an actor's tasks in submission order), so it starts the next without waiting for
the driver. The queue's last tasks (one fewer than there are actors) are held back for whichever actor frees
first, so the round's tail stays short. Results are yielded as they complete. :meth:`ClientPool.submit`
queues tasks without waiting for them (e.g. the next round's, while this round's weights are evaluated);
:meth:`ClientPool.run` yields the outcomes of its tasks, submitting them first, ahead of the queue, when they
were not submitted yet.

An actor that dies (``ray.kill``, node loss, OOM kill) or hangs (its running task passes its deadline, see
:class:`TaskDeadlines`) is killed and replaced by a fresh one; its running task is re-dispatched up to
``retries`` times, after which it is reported as failed and the caller decides (aggregate the survivors).
The task queued behind it never started: it goes back to the queue uncounted. Errors raised *by our code*
inside a task are not retried: they propagate, so a bug never turns into silently missing updates. No wait
here is without a deadline.

Ray's own actor restarts (``max_restarts``) are not used because they retry a task on the same actor
handle without telling the server; here every death is visible, logged and counted.

:class:`IdleActors` carries a finished run's actors over to the next run of the same driver scope (the arms of
one seed in ``gptfl run``): the pool adopts them, reconfigured for its run, instead of starting processes.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorAlreadyExistsError, ActorUnavailableError, GetTimeoutError, RayActorError

from gptfl_ray.fl.client import ClientSpec, FLClient

log = logging.getLogger(__name__)

ACTOR_FAILURES = (RayActorError, ActorUnavailableError)
START_TIMEOUT_S = 600.0  # an actor (first or replacement) must answer its first call within this
PING_TIMEOUT_S = 60.0  # an idle actor answers a ping at once; one that does not is hung
QUEUE_DEPTH = 2  # tasks in flight per actor: the running one and the one queued behind it


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
    batch: _Batch | None = field(default=None, repr=False, compare=False)  # set by ClientPool.submit


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


class _Batch:
    """Tasks submitted together: their retry budget and the outcomes not yet handed to the caller."""

    def __init__(self, size: int, retries: int):
        self.retries = retries
        self.open = size  # tasks without an outcome yet
        self.outcomes: deque[Outcome] = deque()

    def report(self, outcome: Outcome) -> None:
        self.open -= 1
        self.outcomes.append(outcome)


@dataclass
class _Running:
    slot: int
    task: Task
    ref: ray.ObjectRef
    started: float  # time.monotonic() at dispatch, or when the task ahead of it on its actor was seen done


@dataclass(frozen=True)
class ActorKind:
    """What makes a client actor reusable by another run: its class and the resources it holds."""

    cls: type
    num_cpus: float
    num_gpus: float


class IdleActors:
    """Client actors between two runs of one driver scope, e.g. the arms of one seed in ``gptfl run``.

    A finished run gives its actors back; the next run takes those of its kind (the pool reconfigures them)
    and every other idle actor is killed, so none keeps CPUs the new run's actors need. Idle actors hold their
    resources: use a scope only around consecutive FL runs, with no other Ray work in between. An adopted actor
    keeps the name and namespace of the run that started it (the dashboard shows it under that run's
    namespace). ``close`` (or leaving the ``with`` block) kills what is left."""

    def __init__(self) -> None:
        self._idle: list[tuple[ActorKind, Any]] = []

    def give(self, kind: ActorKind, actors: list[Any]) -> None:
        self._idle += [(kind, a) for a in actors]

    def take(self, kind: ActorKind, n: int) -> list[Any]:
        mine = [a for k, a in self._idle if k == kind][:n]
        taken = {id(a) for a in mine}
        self._idle = [(k, a) for k, a in self._idle if id(a) not in taken]
        self.close()
        return mine

    def close(self) -> None:
        for _, a in self._idle:
            ray.kill(a, no_restart=True)
        self._idle = []

    def __enter__(self) -> IdleActors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        depth: int = QUEUE_DEPTH,
        adopt: list[Any] | None = None,
    ):
        """``adopt``: running actors of ``actor_cls`` with these resources (from :class:`IdleActors`) that take
        the first slots, reconfigured for ``spec``; the other slots get new actors."""
        self.spec = spec
        self.depth = depth
        self.peak_depth = 0  # most tasks in flight on one actor so far
        self.namespace = namespace
        self.max_replacements = max_replacements
        self.replacements = 0
        self.on_event = on_event or (lambda e: None)
        self.deadlines = deadlines or TaskDeadlines()
        self.start_timeout_s = start_timeout_s
        self._remote_cls = ray.remote(actor_cls)
        self._options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": 0}
        self.kind = ActorKind(actor_cls, num_cpus, num_gpus)
        adopt = (adopt or [])[:size]
        # an adopted actor's reconfiguration answers its first call (see wait_ready)
        self._first_answer: dict[int, Any] = {
            slot: a.reconfigure.remote(spec) for slot, a in enumerate(adopt)
        }
        self.actors = [*adopt, *(self._start(slot, f"fl-client-{slot}") for slot in range(len(adopt), size))]
        self._queue: deque[Task] = deque()
        self._lanes: list[deque[_Running]] = [deque() for _ in range(size)]  # per actor, in its run order

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

    def _lost(self, run: _Running, err: BaseException) -> None:
        """The running task of an actor that died or hung: log it, replace the actor, re-queue the task (and
        those queued behind it, which never started) or give it up."""
        task, lane = run.task, self._lanes[run.slot]
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
        waiting = [r.task for r in lane]
        lane.clear()
        self._replace(run.slot, err)
        for t in reversed(waiting):  # never started on the lost actor: not a dispatch
            t.dispatches -= 1
            self._queue.appendleft(t)
        if task.dispatches <= task.batch.retries:
            self._queue.appendleft(task)
            return
        what = "timed out" if isinstance(err, TaskTimeoutError) else "died"
        task.batch.report(Outcome(task, error=f"actor {what} ({type(err).__name__})"))

    def _deadline(self, run: _Running) -> float:
        return run.started + self.deadlines.seconds(run.task.method, run.task.cost)

    def submit(self, tasks: list[Task], retries: int, *, front: bool = False) -> None:
        """Queue ``tasks`` (each re-dispatched up to ``retries`` times after its actor is lost); ``front``: ahead
        of the tasks already waiting. They start when a caller next waits on the pool (:meth:`run`)."""
        batch = _Batch(len(tasks), retries)
        for t in tasks:
            t.batch = batch
        if front:
            self._queue.extendleft(reversed(tasks))
        else:
            self._queue.extend(tasks)

    def run(self, tasks: list[Task], retries: int) -> Iterator[Outcome]:
        """Yield the outcome of each of ``tasks`` as it completes (completion order); tasks not submitted yet
        are submitted first, ahead of the queue. Waiting here also runs every other queued task."""
        if not tasks:
            return
        batch = tasks[0].batch
        if batch is None:
            self.submit(tasks, retries, front=True)
            batch = tasks[0].batch
        while batch.open or batch.outcomes:
            if batch.outcomes:
                yield batch.outcomes.popleft()
            else:
                self._step()

    def _dispatch(self) -> None:
        """Idle actors take the queue's first tasks; then each busy actor gets one queued behind its running
        task while more tasks wait than there are other actors."""
        others = len(self.actors) - 1
        for depth in range(self.depth):
            for slot, lane in enumerate(self._lanes):
                if not self._queue:
                    return
                if len(lane) == depth and (depth == 0 or len(self._queue) > others):
                    task = self._queue.popleft()
                    task.dispatches += 1
                    ref = getattr(self.actors[slot], task.method).remote(*task.args)
                    lane.append(_Running(slot, task, ref, time.monotonic()))
                    self.peak_depth = max(self.peak_depth, len(lane))

    def _step(self) -> None:
        """Dispatch, wait for the next running task to finish or pass its deadline, and settle it."""
        self._dispatch()
        heads = {lane[0].ref: lane[0] for lane in self._lanes if lane}
        if not heads:
            raise RuntimeError("client pool: waiting on tasks that are neither queued nor running")
        wait_s = min(self._deadline(r) for r in heads.values()) - time.monotonic()
        ready, _ = ray.wait(list(heads), num_returns=1, timeout=max(0.0, wait_s))
        if ready:  # and any other that finished meanwhile
            ready, _ = ray.wait(list(heads), num_returns=len(heads), timeout=0)
        for ref in ready:
            run = heads.pop(ref)
            lane = self._lanes[run.slot]
            lane.popleft()
            try:
                value = ray.get(ref)
            except ACTOR_FAILURES as err:
                self._lost(run, err)
                continue
            now = time.monotonic()
            self.deadlines.record(run.task.method, now - run.started, run.task.cost)
            if lane:  # the task queued behind it starts now
                lane[0].started = max(lane[0].started, now)
            run.task.batch.report(Outcome(run.task, value, actor=self.actors[run.slot]))
        now = time.monotonic()
        overdue = [ref for ref, run in heads.items() if self._deadline(run) <= now]
        if overdue:  # those that finished while the caller held us count as finished, not hung
            _, overdue = ray.wait(overdue, num_returns=len(overdue), timeout=0)
        for ref in overdue:
            run = heads[ref]
            self._lanes[run.slot].popleft()
            limit = self.deadlines.seconds(run.task.method, run.task.cost)
            self._lost(run, TaskTimeoutError(f"{run.task.method} ran past its {limit:.3g} s deadline"))

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
        refs = [self._first_answer.pop(slot, None) or a.info.remote() for slot, a in enumerate(self.actors)]
        try:
            infos = ray.get(refs, timeout=self.start_timeout_s)
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
        self.actors, self._lanes = [], []
        self._queue.clear()
        self._first_answer.clear()

    def release(self) -> list[Any]:
        """Hand the actors over (to :class:`IdleActors`), leaving the pool empty; nothing may be in flight."""
        assert not self._queue and not any(self._lanes), "tasks still in flight"
        actors, self.actors, self._lanes = self.actors, [], []
        self._first_answer.clear()
        return actors
