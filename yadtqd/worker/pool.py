"""The execution pool: one process per slot, so a task past its time limit can be killed.

The worker's main loop owns the pool and never blocks on it: it waits on :meth:`Pool.waitables`
with everything else, then calls :meth:`Pool.collect`. A slot whose process dies or is killed is
replaced at once with a fresh process. Each slot has three pipes, each one way: one that brings
it jobs, read by its main thread, one that brings it pings (which a thread of its own answers, so
:meth:`Pool.responsive` tells a wedged pool from one that runs long tasks; a process that never
finishes loading its plugins counts as wedged too), and one for all it sends back.

Short tasks go to a slot in *batches* (:meth:`Pool.submit` with several jobs): one pipe write
carries up to :data:`BATCH_MOST` jobs, which the process runs one after the other, sending each
outcome as it ends (issue 15: a job handed over and answered alone cost 64 µs of CPU across the
two processes for an ``add``, 21 a job in batches of 8, mostly the wake-ups of both). Each
outcome still names its job, and the jobs run in order, so when the process dies, the job
without an outcome that came first is the one that ran, and those after it never started: they
come back to the worker (:meth:`Pool.take_returned`) to run elsewhere. A batch is short-lived:
its jobs start only within :data:`BATCH_WINDOW` of the hand-over (and within the worker's lease);
once it has passed and every outcome sent before it was read, the job the slot runs is the
last of the batch to start, and the others come back at once (the process reports them as not
started when that one ends; the slot takes nothing new before). A cancel of a job of a batch
waits for the same moment: only then does the pool know which job runs, and that no other can
start behind it (:meth:`Pool.cancel`).

A reload (:meth:`Pool.recycle`) first starts one *probe* process with the plugins as installed
now. Only once it has loaded them are the slots replaced (idle ones at once, busy ones when
their task ends). If it exits or hangs while loading (a plugin calling ``sys.exit()`` or
blocking at import), the reload is abandoned and the slots keep the plugins they have.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

import msgspec

from yadtqd import openfiles
from yadtqd.errors import YadtqError
from yadtqd.worker import child
from yadtqd.worker.child import Job, Outcome, Ready
from yadtqd.worker.slot import Slot, close_pipes, death, spawn, stop

log = logging.getLogger("yadtqd.worker")

#: The most jobs one pipe write hands to a slot (:meth:`Pool.submit`).
BATCH_MOST = 8
#: Seconds after the hand-over within which the jobs of a batch may start.
BATCH_WINDOW = 0.02
#: :meth:`Pool.cancel`'s answers: the job is being stopped; ask again later (it is in a batch).
STOPPING, LATER = "stopping", "later"
#: Seconds a task name's runs take at most (their moving average, :meth:`Pool.short`) for its
#: jobs to go in batches.
SHORT_TASK = 0.001
#: Weight of the newest run in a task name's moving average.
SMOOTHING = 0.25
#: Seconds an execution process may take to load its plugins before it counts as wedged (at
#: least; ``stall_timeout`` when that is longer).
LOAD_GRACE = 10.0

_outcome = msgspec.json.Decoder(Outcome)
_ready = msgspec.json.Decoder(Ready)


class Pool:
    """``size`` execution processes started with the spawn method (no fork of a Kafka client)."""

    def __init__(self, size: int, max_result_bytes: int, plugins: tuple[str, ...] = (),
                 max_memory: int = 0) -> None:
        self.size = size
        self.max_result_bytes = max_result_bytes
        self.plugins = plugins
        self.max_memory = max_memory
        self.ctx = multiprocessing.get_context("spawn")
        self.slots: list[Slot] = []
        self.generation = 0
        self.tasks: dict[str, dict[str, str]] = {}
        self.problems: dict[str, str] = {}
        self.ping_interval = 1.0
        self.load_grace = LOAD_GRACE
        #: Seconds after the hand-over within which the jobs of a batch may start.
        self.batch_window = BATCH_WINDOW
        #: Task name → the moving average of its runs' seconds (:meth:`short`).
        self.runtimes: dict[str, float] = {}
        #: Jobs of batches that never started, their process gone (:meth:`take_returned`).
        self.returned: list[Job] = []
        #: The process loading the plugins for a reload, before the slots are replaced.
        self.probe: Slot | None = None
        self._last_ping = 0.0
        #: The soft open-files limit the worker started with: its execution processes get it back.
        self.open_files = 0

    def start(self) -> None:
        """Start every slot's process (they become ready as their plugins load), once sure that
        the worker may open the files they take (:mod:`yadtqd.openfiles`)."""
        self.open_files = openfiles.ensure(openfiles.worker_needs(self.size),
                                           f"[worker] slots = {self.size}")
        self.slots = [self._spawn() for _ in range(self.size)]

    def _spawn(self) -> Slot:
        return spawn(self.ctx, self.generation, self.max_result_bytes, self.plugins,
                     self.max_memory, self.open_files)

    @property
    def free(self) -> int:
        """Slots ready to take a job now."""
        return sum(1 for s in self.slots if s.ready and s.job is None and not s.unreported)

    @property
    def busy(self) -> int:
        """Slots running a job."""
        return sum(1 for s in self.slots if s.job is not None)

    @property
    def queued(self) -> int:
        """Jobs waiting in batches behind the one their slot runs."""
        return sum(len(s.queue) for s in self.slots)

    def running(self) -> list[Job]:
        """The jobs the processes hold: those running, then those waiting in their batches."""
        running = [s.job for s in self.slots if s.job is not None]
        return running + [job for s in self.slots for job in s.queue]

    def short(self, name: str) -> bool:
        """Whether the runs of ``name`` here have taken at most :data:`SHORT_TASK` (on average,
        lately): its jobs may go in batches. False until one has ended."""
        seconds = self.runtimes.get(name)
        return seconds is not None and seconds <= SHORT_TASK

    def submit(self, jobs: Job | list[Job], timeout: float | None, start_by: float = float("inf")) -> None:
        """Give a job, or a batch of jobs run one after the other, to a free slot; the caller
        checked :attr:`free`. ``timeout`` bounds a single job; a batch has none (the caller
        batches only jobs without one, of names that are :meth:`short`), and its jobs start
        only until :data:`BATCH_WINDOW` from now or ``start_by`` (the lease), if sooner."""
        batch = jobs if isinstance(jobs, list) else [jobs]
        assert batch and (len(batch) == 1 or not timeout), "a batch of jobs has no timeout"
        slot = next(s for s in self.slots if s.ready and s.job is None and not s.unreported)
        slot.job, slot.queue = batch[0], batch[1:]
        if isinstance(jobs, list):
            slot.start_by = min(time.monotonic() + self.batch_window, start_by)
            for job in batch:
                job.start_by = slot.start_by
        slot.began = time.monotonic()
        slot.deadline = time.monotonic() + timeout if timeout else None
        try:
            slot.jobs.send_bytes(msgspec.json.encode(jobs))
        except OSError:
            pass  # the process died: collect() sees its exit and fails this job with how it ended

    def waiting(self) -> set[tuple[str, int]]:
        """(task id, attempt) of the jobs waiting in batches behind the one their slot runs."""
        return {job.key for s in self.slots for job in s.queue}

    def take_returned(self) -> list[Job]:
        """The jobs of batches that never started because their process ended first (a job
        before them crashed it, or it was replaced), in order: to run again, as never run."""
        returned, self.returned = self.returned, []
        return returned

    def waitables(self) -> list[Connection]:
        """The pipes to wait on for outcomes."""
        return [s.conn for s in self.slots] + ([self.probe.conn] if self.probe else [])

    def collect(self, ready: Sequence[object]) -> list[Outcome]:
        """Read what the ready pipes say; replace slots whose process died; take back the jobs
        of batches past their window."""
        outcomes = self._collect_exits(ready)
        answered = [s for s in self.slots if s.conn in ready]
        if self.probe is not None and self.probe.conn in ready:
            self._collect_probe()
        for slot in answered:
            if slot not in self.slots:
                continue  # retired by the reload just now (an idle slot: nothing to read)
            outcomes += self._read(slot)
        self._reclaim()
        return outcomes

    def _reclaim(self) -> None:
        """Past a batch's window, with every outcome sent before it read, the job its slot runs
        is the last of the batch to start: the others come back now, to run elsewhere, rather
        than when that one ends."""
        mono = time.monotonic()
        for slot in self.slots:
            if slot.queue and mono > slot.start_by and not slot.conn.poll(0):
                self.returned += slot.queue
                slot.unreported += len(slot.queue)
                slot.queue = []

    def _read(self, slot: Slot) -> list[Outcome]:
        """What one slot's pipe holds now: every outcome of its batch that ended, in order."""
        outcomes: list[Outcome] = []
        while True:
            try:
                raw = slot.conn.recv_bytes()
            except (EOFError, OSError):
                return outcomes + self._replace(slot, "ExecutionProcessDied", "the execution process "
                                                + death(slot.process) + " while running the task")
            slot.last_answer = time.monotonic()
            if raw == b"pong":
                pass
            elif not slot.ready:
                hello = _ready.decode(raw)
                slot.ready = True
                if slot.generation == self.generation:
                    self.tasks, self.problems = hello.tasks, hello.problems
            else:
                ended = self._ended(slot, _outcome.decode(raw))
                if ended is not None:
                    outcomes.append(ended)
                if (slot.job is None and not slot.unreported
                        and (slot.generation != self.generation or slot.cancelled)):
                    self._replace(slot, "", "")  # a cancelled task's subprocesses end with its group
                    return outcomes
            if not slot.conn.poll(0):
                return outcomes

    def _ended(self, slot: Slot, outcome: Outcome) -> Outcome | None:
        """The slot's running job ended (note its time), or it was a job of a batch that did
        not start (None; it goes back); the next of its batch is the one to start."""
        if outcome.status == child.UNSTARTED:
            if slot.job is not None and slot.job.key == outcome.key:
                self.returned.append(slot.job)
                slot.job = slot.queue.pop(0) if slot.queue else None
            else:  # taken back before (:meth:`_reclaim`)
                slot.unreported = max(0, slot.unreported - 1)
            return None
        if slot.cancelled and outcome.status != "success":
            outcome.status = "cancelled"  # stopped by the cancel (a success came first)
        if slot.job is not None and outcome.runtime is not None:
            known = self.runtimes.get(slot.job.task)
            self.runtimes[slot.job.task] = outcome.runtime if known is None else (
                known + SMOOTHING * (outcome.runtime - known))
        slot.job = slot.queue.pop(0) if slot.queue else None
        slot.began, slot.deadline = time.monotonic(), None
        return outcome

    def _collect_exits(self, ready: Sequence[object]) -> list[Outcome]:
        """Busy slots whose process exited with nothing left in its pipe: the task failed, the
        group is ended, the slot replaced. Its exit is asked of the kernel (``waitpid``): a
        child it forked may hold its pipe open, and its sentinel, for good."""
        outcomes = []
        for slot in [s for s in self.slots if (s.job is not None or s.unreported) and s.conn not in ready]:
            if slot.process.exitcode is None or slot.conn.poll(0):
                continue  # running, or it said something first (an outcome, or the pipe's end)
            outcomes += self._replace(slot, "ExecutionProcessDied", "the execution process "
                                      + death(slot.process) + " while running the task")
        return outcomes

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until every slot's process has loaded its plugins (at start only)."""
        deadline = time.monotonic() + timeout
        while not all(s.ready for s in self.slots):
            if time.monotonic() > deadline:
                raise YadtqError(f"the execution processes did not load their plugins within"
                                 f" {timeout:g} s: a plugin blocks at import")
            self.collect(wait(self.waitables(), max(0.0, deadline - time.monotonic())))

    def recycle(self) -> None:
        """Reload the plugins: start a probe process that loads them; the slots are replaced
        once it has (idle ones at once, busy ones when their job ends, so running tasks are
        undisturbed). A reload during a reload starts over."""
        if self.probe is not None:
            self._end_probe()
        self.runtimes.clear()  # the new plugins' tasks are timed anew before they go in batches
        self.probe = self._spawn()
        self.probe.generation = self.generation + 1

    @property
    def settled(self) -> bool:
        """No reload under way, and every process is ready and of the current generation."""
        if self.probe is not None:
            if time.monotonic() - self.probe.last_answer > self.load_grace:
                self._end_probe()
                log.error("plugin reload abandoned: the new plugins did not load within %g s"
                          " (one blocks at import); keeping the plugins loaded before",
                          self.load_grace, extra={"event": "reload_failed"})
            return False
        return all(s.ready and s.generation == self.generation for s in self.slots)

    def _collect_probe(self) -> None:
        probe = self.probe
        assert probe is not None
        try:
            hello = _ready.decode(probe.conn.recv_bytes())
        except (EOFError, OSError):
            self._end_probe()
            log.error("plugin reload abandoned: the process loading the new plugins %s;"
                      " keeping the plugins loaded before", death(probe.process),
                      extra={"event": "reload_failed"})
            return
        self.probe = None
        self.generation = probe.generation
        self.tasks, self.problems = hello.tasks, hello.problems
        probe.ready = True
        probe.last_answer = time.monotonic()
        idle = [s for s in self.slots if s.job is None]
        if idle:  # the probe takes an idle slot's place; the other idle ones are replaced
            self._retire(idle[0], probe)
        else:  # every slot is busy: each is replaced when its job ends
            stop(probe)
        for slot in [s for s in self.slots if s.job is None and s.generation != self.generation]:
            self._replace(slot, "", "")

    def _end_probe(self) -> None:
        probe, self.probe = self.probe, None
        if probe is not None:
            stop(probe)

    def advertised(self) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
        """The tasks (and plugin problems) the current generation's processes reported."""
        return self.tasks, self.problems

    def expire(self) -> list[Outcome]:
        """Kill and replace slots whose job ran past its timeout; their jobs fail."""
        now = time.monotonic()
        outcomes = []
        for slot in [s for s in self.slots if s.deadline is not None and s.deadline <= now]:
            outcomes += self._replace(slot, "TimeoutError", "the task ran past its timeout and was killed")
        return outcomes

    def next_deadline(self) -> float | None:
        """The monotonic time of the earliest job timeout."""
        deadlines = [s.deadline for s in self.slots if s.deadline is not None]
        deadlines += [s.start_by for s in self.slots if s.queue]  # then :meth:`_reclaim`
        return min(deadlines) if deadlines else None

    def cancel(self, task_id: str, attempt: int, grace: float) -> str:
        """Stop a running job for an operator's cancel: SIGTERM to its execution process (the
        task sees :class:`~yadtqd.worker.child.TaskCancelled`), SIGKILL of its group after
        ``grace`` seconds; its outcome then says ``cancelled`` (:data:`STOPPING`). A job of a
        batch: :data:`LATER` while the batch may still start jobs, or outcomes sent before wait
        in the pipe (the signal could reach another job), and while the job waits (it will not
        start: it comes back). "" when no process holds it."""
        key = (task_id, attempt)
        if key in {job.key for job in self.returned}:
            return LATER  # back from a batch, not started: the worker has it next
        for slot in self.slots:
            if slot.job is None or key not in [job.key for job in (slot.job, *slot.queue)]:
                continue
            if slot.queue and (time.monotonic() <= slot.start_by or slot.conn.poll(0)):
                return LATER
            if slot.job.key != key:
                return LATER  # waiting past the window: it comes back, never started
            if not slot.cancelled and slot.process.pid is not None:
                slot.cancelled = True
                deadline = time.monotonic() + grace
                slot.deadline = min(slot.deadline or deadline, deadline)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signal.SIGTERM)
            return STOPPING
        return ""

    def kill_running(self) -> list[Job]:
        """Kill every running job (the epoch was fenced), and drop those waiting in batches;
        return them all."""
        killed = self.running()
        for slot in [s for s in self.slots if s.job is not None]:
            self._replace(slot, "Fenced", "the worker epoch was fenced")
        self.returned = []  # the epoch's: nothing of it runs again here
        return killed

    def ping(self) -> None:
        """Ask every process to answer, at most once per ``ping_interval``."""
        now = time.monotonic()
        if now - self._last_ping < self.ping_interval:
            return
        self._last_ping = now
        for slot in self.slots:
            if slot.ready:
                try:
                    slot.pings.send_bytes(b"ping")
                except OSError:
                    pass  # the process died; collect() sees the closed pipe and replaces it

    def responsive(self, grace: float) -> bool:
        """True when every ready process answered within ``grace`` seconds, and every other
        one finished loading its plugins within :attr:`load_grace`."""
        now = time.monotonic()
        return all(now - s.last_answer <= (grace if s.ready else self.load_grace) for s in self.slots)

    def close(self, timeout: float = 5.0) -> None:
        """Stop every process: close the pipes, wait, then kill what is left."""
        self._end_probe()
        for slot in self.slots:
            close_pipes(slot)
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            slot.process.join(max(0.0, deadline - time.monotonic()))
            stop(slot)  # its group too: what an abandoned task started must not outlive it
        self.slots = []

    def _retire(self, slot: Slot, successor: Slot) -> None:
        stop(slot)
        self.slots[self.slots.index(slot)] = successor

    def _replace(self, slot: Slot, kind: str, message: str) -> list[Outcome]:
        job = slot.job
        if job is not None and kind not in ("", "Fenced"):  # a fenced epoch's do not run again
            for waiting in slot.queue:  # (not said to have started: they waited behind it)
                log.info("task %s attempt %d did not start: its batch's execution process %s"
                         " ended (%s) while running task %s; it runs again", waiting.task_id,
                         waiting.attempt, slot.process.pid, kind, job.task_id,
                         extra={"task_id": waiting.task_id, "event": "task_not_started"})
        self.returned += slot.queue  # never started: the job before them was running
        slot.queue = []
        stop(slot)
        fresh = self._spawn()
        self.slots[self.slots.index(slot)] = fresh
        if job is None:
            if kind:
                log.warning("execution process %s %s; replaced", slot.process.pid,
                            death(slot.process))
            return []
        if slot.cancelled:
            kind, message = "Cancelled", f"stopped by an operator's cancel ({message})"
        error = {"type": kind, "message": message}
        return [Outcome(task_id=job.task_id, attempt=job.attempt, epoch=job.epoch,
                        status="cancelled" if slot.cancelled else "failed",
                        error=error, runtime=time.monotonic() - slot.began)]
