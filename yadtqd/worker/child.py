"""The execution process: one per slot. It loads the plugins itself, then runs one job at a time
(a batch of short jobs, one after the other).

Jobs come from :mod:`yadtqd.worker.pool` as JSON over a pipe of their own, which the main thread
reads itself (no handover between threads on a task's path: 15 to 25 µs of CPU a job); pings
come over a second pipe, which a thread reads to answer them while a task runs, so a long task
is not taken for a wedged process. Outcomes and answers go back over a third. Each pipe goes one
way: when one socket carried both the pings in and the outcomes out, the thread waiting for a
ping woke each time the worker read outcomes (a reader and a writer wait in one queue on a
socket), about one context switch per task machine-wide (issue 15). A task that
raises, returns something that is not JSON, or returns too much is a failed *outcome*, never a
crash of this process.

Each execution process leads a process group of its own, so whatever a task starts
(subprocesses, forks) is in it, and the pool ends the whole group with the task (a timeout, a
fence, a stop). When the worker dies, the kernel sends this process SIGUSR2
(``PR_SET_PDEATHSIG``) and its handler ends the group; the pipes closing do the same from the
thread that answers pings. (A task holding the interpreter lock in a C call delays both until it
returns.)
"""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import os
import resource
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from yadtqd import context, openfiles, plugins
from yadtqd import messages as m


class Job(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One execution, as the pool sends it."""

    task_id: str
    attempt: int
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    worker: str
    epoch: str
    #: A job of a batch starts only before this (``time.monotonic``, the same clock in every
    #: process here): the batch's window, and the worker's lease. None for a job alone.
    start_by: float | None = None

    @property
    def key(self) -> tuple[str, int]:
        """(task id, attempt): the job, as the worker and its outcome name it."""
        return self.task_id, self.attempt


class Ready(msgspec.Struct, kw_only=True):
    """The first message of an execution process: what its plugins provide."""

    tasks: dict[str, dict[str, str]]
    problems: dict[str, str]


class Outcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What came of one job: ``result`` is raw JSON text on success."""

    task_id: str
    attempt: int
    epoch: str
    status: str
    result: str = "null"
    error: dict[str, str] | None = None
    #: Seconds the task function ran (None when it never ran).
    runtime: float | None = None

    @property
    def key(self) -> tuple[str, int]:
        """(task id, attempt): the job this outcome is of."""
        return self.task_id, self.attempt


_jobs = msgspec.json.Decoder(Job | list[Job])
#: The status of a job of a batch not started (its ``start_by`` passed): not an outcome.
UNSTARTED = "unstarted"

#: Set while a task function runs (in the main thread, where signal handlers run too).
_in_task = False
#: A cancel came between tasks (the job may be on its way): the next task stops at once. The
#: worker replaces a process it cancelled after its outcome, so no later job sees this.
_cancel_pending = False


class TaskCancelled(BaseException):
    """Raised in a running task when the worker stops it for an operator's cancel (SIGTERM from
    the worker): the task's ``finally`` blocks run; ``except Exception`` does not catch it."""


def main(pings: Connection, answers_out: Connection, jobs: Connection, max_result_bytes: int,
         only: tuple[str, ...], max_memory: int = 0, open_files: int = 0) -> None:
    """Entry point of an execution process (started by the pool with the spawn method): ``jobs``
    brings the jobs, ``pings`` the pings; ``answers_out`` takes the answers and outcomes back.
    ``open_files``: the soft open-files limit the worker started with (0: leave it)."""
    os.setpgid(0, 0)  # a group of its own: the pool ends it whole
    if open_files:
        openfiles.restore(open_files)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.getLogger("yadtqd.plugins").disabled = True  # problems go to the worker, once
    importlib.invalidate_caches()
    registry = plugins.load(only)
    answers = _Answers(pings, answers_out)
    tasks = {name: {"plugin": e.plugin, "version": e.version} for name, e in registry.tasks.items()}
    threading.Thread(target=answers.serve_pings, daemon=True).start()  # its stack before the limit
    if max_memory:  # after the plugins loaded: the limit is the tasks'
        used = _address_space()
        if used >= max_memory:
            registry.problems["max_task_memory"] = (
                f"[worker] max_task_memory = {max_memory} bytes is below what an execution process"
                f" uses before any task ({used} bytes): not applied")
        else:
            resource.setrlimit(resource.RLIMIT_AS, (max_memory, max_memory))
    try:
        answers.send(msgspec.json.encode(Ready(tasks=tasks, problems=registry.problems)))
        while (batch := _next_jobs(jobs)) is not None:
            for index, job in enumerate(batch):  # in order, each outcome sent as it ends
                if job.start_by is not None and time.monotonic() > job.start_by:
                    for late in batch[index:]:  # the pool gives them back to the worker
                        answers.send(msgspec.json.encode(Outcome(
                            task_id=late.task_id, attempt=late.attempt, epoch=late.epoch,
                            status=UNSTARTED)))
                    break
                if not answers.begin():
                    return
                outcome = run(registry, job, max_result_bytes, max_memory)
                answers.end()
                answers.send(msgspec.json.encode(outcome))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the worker closed the pipe (it stopped, or gave this task up at its stop timeout)


def _next_jobs(jobs: Connection) -> list[Job] | None:
    """The next job, or batch of jobs, or None once the pool closed the pipe. A job that cannot
    even be read for lack of memory (a task before it leaked) ends this process: the pool fails
    that job and starts a fresh process."""
    try:
        read = _jobs.decode(jobs.recv_bytes())
        return read if isinstance(read, list) else [read]
    except (EOFError, OSError):
        return None
    except MemoryError:
        os._exit(3)


class _Answers:
    """The pipe back to the pool: outcomes from the main thread, and answers to pings (read from
    a pipe of their own) from a thread of their own."""

    def __init__(self, pings: Connection, out: Connection) -> None:
        self.pings = pings
        self.out = out
        self.send_lock = threading.Lock()
        #: A task runs now (set by the main thread); the pool closed the pipe. Both under
        #: ``state_lock``: a job read just as the pool went away is never run unwatched.
        self.state_lock = threading.Lock()
        self.running = False
        self.closed = False

    def begin(self) -> bool:
        """A job is about to run: False (do not run it) if the pool has gone away."""
        with self.state_lock:
            self.running = not self.closed
            return self.running

    def end(self) -> None:
        """The job ended."""
        with self.state_lock:
            self.running = False

    def send(self, raw: bytes) -> None:
        with self.send_lock:
            self.out.send_bytes(raw)

    def serve_pings(self) -> None:
        """Answer every ping, until the pool closes the pipe: then, if a task runs, end it and
        all it started (the worker went away)."""
        while True:
            try:
                raw = self.pings.recv_bytes()
            except MemoryError:  # a task ate the memory: keep answering pings
                continue
            except (EOFError, OSError):
                raw = b""
            if raw == b"ping":
                try:
                    self.send(b"pong")
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    raw = b""  # the worker is gone: as if it had closed the pipe
            if not raw:
                with self.state_lock:
                    self.closed = True
                    if self.running:
                        _end_group()
                return


def run(registry: plugins.Registry, job: Job, max_result_bytes: int, max_memory: int = 0) -> Outcome:
    """Run one job and turn whatever happens into an outcome."""
    entry = registry.tasks.get(job.task)
    if entry is None:
        return _failed(job, "UnknownTask", f"no installed plugin provides task {job.task!r}")
    context._set(context.TaskContext(job.task_id, job.attempt, job.worker, job.epoch))
    began = time.monotonic()
    global _in_task
    try:
        _in_task = True
        try:
            if _cancel_pending:
                raise TaskCancelled()
            value = entry.function(*job.args, **job.kwargs)
        finally:
            _in_task = False
    except TaskCancelled:
        outcome = _failed(job, "Cancelled", "stopped by an operator's cancel")
    except MemoryError as exc:
        traceback.clear_frames(exc.__traceback__)  # free what the task held before formatting
        del exc
        outcome = _failed(job, "MemoryError", "the task ran out of memory" + (
            f" ([worker] max_task_memory = {max_memory} bytes)" if max_memory else ""))
    except (Exception, SystemExit) as exc:  # a task's failure is a result, not a crash of this process
        outcome = _failed(job, _type_name(exc), _text(exc), traceback.format_exc())
    else:
        outcome = _encode_result(job, value, max_result_bytes)
    finally:
        context._set(None)
    outcome.runtime = time.monotonic() - began
    return outcome


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as inner:  # a __str__ that raises must not lose the outcome
        return f"(str() of the exception raised {type(inner).__name__})"


def _encode_result(job: Job, value: Any, limit: int) -> Outcome:
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        return _failed(job, "ResultNotJSON", f"the task's return value is not JSON: {exc}")
    if len(text.encode()) > limit:
        return _failed(job, "ResultTooLarge",
                       f"the task's result is {len(text.encode())} bytes, over the limit of {limit}")
    return Outcome(task_id=job.task_id, attempt=job.attempt, epoch=job.epoch, status="success",
                   result=text)


def _failed(job: Job, kind: str, message: str, tb: str = "") -> Outcome:
    """A failed outcome; the message and traceback are capped (a 2 MB exception message must
    not make an event Kafka refuses)."""
    info = m.ErrorInfo(type=kind, message=message, traceback=tb).capped()
    error = {"type": info.type, "message": info.message}
    if info.traceback:
        error["traceback"] = info.traceback
    return Outcome(task_id=job.task_id, attempt=job.attempt, epoch=job.epoch, status="failed",
                   error=error)


def _address_space() -> int:
    """This process's address space now (VmSize), in bytes; 0 when it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _die_with_parent() -> None:
    """End this process's group when the worker process dies: the kernel sends SIGUSR2 then
    (Linux ``PR_SET_PDEATHSIG``), whose handler ends the group, task subprocesses included. (Not
    SIGTERM: while a dying worker's threads exit one by one, ``getppid()`` may still name it, so
    the two signals cannot share a handler.) A SIGTERM is the worker's cancel of the running
    task (:class:`TaskCancelled`), kept for the next task when it comes between two."""
    signal.signal(signal.SIGUSR2, lambda signum, frame: _end_group())
    signal.signal(signal.SIGTERM, _on_sigterm)
    # a task's fork is not the group's leader: SIGTERM must end it alone, as usual
    os.register_at_fork(after_in_child=_default_signals)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGUSR2)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the pipe's end still ends the group
    if os.getppid() == 1:  # the worker died before the request took effect
        _end_group()


def _default_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def _on_sigterm(signum: int, frame: object) -> None:
    global _cancel_pending
    if _in_task:
        raise TaskCancelled()
    _cancel_pending = True


def _end_group() -> None:
    """SIGKILL this process's group: the task, and everything it started."""
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _type_name(exc: BaseException) -> str:
    kind = type(exc)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
