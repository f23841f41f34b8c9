"""Tasks for demos and tests: ``sleep``, ``fail``, ``flaky``, ``echo``, ``cpu``, ``ledger``,
``hog``, ``blob``, ``not_json``, ``exit``, ``segfault``, ``spawn``, ``fork_and_exit``,
``allocate`` and ``environment``.

Not for production: these tasks exist to misbehave on demand, and ``ledger`` appends to any
path it is given, as the worker's user.

``ledger`` appends one line when it starts and one when it ends to a file named in its
arguments, with the task id, attempt, worker and pid of the execution: the chaos tests read
that file to prove which executions happened.
"""

from __future__ import annotations

import builtins
import ctypes
import json
import os
import subprocess
import time
from typing import Any

import yadtqd
from yadtqd.context import current
from yadtqd.hookspecs import Register


def sleep(seconds: float) -> float:
    """Sleep, then return the seconds slept."""
    time.sleep(seconds)
    return seconds


def stubborn(seconds: float, path: str = "") -> float:
    """Sleep, ignoring every attempt to stop it (a cancel's SIGTERM included: only SIGKILL
    ends it); with ``path``, append a line there each time it ignores one."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            time.sleep(max(0.0, end - time.monotonic()))
        except BaseException as exc:  # noqa: B036 the point of this task
            if path:
                with open(path, "a") as f:
                    f.write(f"ignored {type(exc).__name__}\n")
    return seconds


def fail(exception: str = "RuntimeError", message: str = "failed on purpose", repeat: int = 1) -> None:
    """Raise the named built-in exception (``ValueError``, ``KeyError``...) with a message
    (``repeat`` times over: a huge message for tests)."""
    kind = getattr(builtins, exception, None)
    if not (isinstance(kind, type) and issubclass(kind, Exception)):
        kind = RuntimeError
    raise kind(message * repeat)


def flaky(succeed_on_attempt: int = 2, value: Any = "ok") -> Any:
    """Fail every attempt before ``succeed_on_attempt``, then return ``value``."""
    ctx = current()
    if ctx is None or ctx.attempt < succeed_on_attempt:
        raise RuntimeError(f"attempt {ctx.attempt if ctx else '?'} fails on purpose")
    return value


def hog(seconds: float) -> float:
    """Hold the interpreter lock for ``seconds`` (a C call that never releases it), so the
    execution process cannot answer the worker's pings: a wedged pool, for tests."""
    ctypes.PyDLL(None).usleep(int(seconds * 1_000_000))
    return seconds


def blob(size: int) -> str:
    """A string of ``size`` characters (to test the result size limit)."""
    return "x" * size


def exit(status: int = 3) -> None:  # noqa: A001 the task's name
    """End the execution process at once with ``status`` (``os._exit``: no cleanup)."""
    os._exit(status)


def segfault() -> None:
    """Crash the execution process with SIGSEGV (a read of address 0)."""
    ctypes.string_at(0)


def spawn(path: str, seconds: float = 600.0) -> None:
    """Start ``sleep 600`` as a subprocess, write both pids to ``path`` as JSON, then sleep
    ``seconds`` (tests check that the subprocess ends with the task)."""
    child = subprocess.Popen(["sleep", "600"])
    _write_pids(path, os.getpid(), child.pid)
    time.sleep(seconds)


def fork_and_exit(path: str) -> None:
    """Fork a child that sleeps 600 s holding every descriptor (the worker's pipe too), write
    both pids to ``path``, then end the execution process with status 3."""
    pid = os.fork()
    if pid == 0:
        time.sleep(600)
        os._exit(0)
    _write_pids(path, os.getpid(), pid)
    os._exit(3)


def _write_pids(path: str, execution: int, child: int) -> None:
    with open(path, "w") as f:
        json.dump({"execution": execution, "child": child}, f)


def allocate(megabytes: int) -> int:
    """Hold ``megabytes`` MiB at once (to test the memory limit); return how many."""
    block = bytearray(megabytes * 1024 * 1024)
    return len(block) // (1024 * 1024)


def environment() -> list[str]:
    """The names of the execution process's environment variables, as exec gave them."""
    with open("/proc/self/environ", "rb") as f:
        return sorted(entry.split(b"=", 1)[0].decode() for entry in f.read().split(b"\0") if entry)


def not_json() -> Any:
    """Return a value that is not JSON (a set), which fails the task."""
    return {1, 2, 3}


def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Return the arguments it was called with."""
    return {"args": list(args), "kwargs": kwargs}


def cpu(n: int = 200_000) -> int:
    """CPU-bound work: the number of primes below ``n`` (a plain sieve)."""
    sieve = bytearray([1]) * max(n, 2)
    sieve[0:2] = b"\x00\x00"
    for i in range(2, int(n**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(sieve[i * i :: i]))
    return sum(sieve)


def ledger(path: str, seconds: float = 0.0, value: Any = None, until: str = "",
           exit_status: int = -1) -> Any:
    """Append ``start`` and ``end`` lines for this execution to ``path``; return ``value``.
    ``until``: a file; the task runs on until it exists (a gate a test opens). ``exit_status``
    (0 or more): end the execution process with it right after the ``start`` line, as ``exit``
    does (a task of a name known to be short that crashes its process)."""
    _append(path, "start")
    if exit_status >= 0:
        os._exit(exit_status)
    time.sleep(seconds)
    while until and not os.path.exists(until):
        time.sleep(0.01)
    _append(path, "end")
    return value


def ledger_after(previous: Any, path: str, seconds: float = 0.0) -> Any:
    """A chain's follow-up of a ``ledger`` task: the same ledger lines; returns ``previous``
    (the parent's result, which a follow-up gets first)."""
    return ledger(path, seconds, previous)


def _append(path: str, phase: str) -> None:
    ctx = current()
    line = json.dumps({
        "task-id": ctx.task_id if ctx else None, "attempt": ctx.attempt if ctx else None,
        "worker": ctx.worker if ctx else None, "epoch": ctx.epoch if ctx else None,
        "pid": os.getpid(), "phase": phase, "ts": time.time(),
    })
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())  # one write under PIPE_BUF: atomic append
    finally:
        os.close(fd)


@yadtqd.hookimpl
def yadtq_register_tasks(register: Register) -> None:
    """Register the demo tasks."""
    for function in (sleep, stubborn, fail, flaky, echo, cpu, ledger, ledger_after, hog, blob, not_json, exit, segfault,
                     spawn, fork_and_exit, allocate, environment):
        register(function.__name__, function)
