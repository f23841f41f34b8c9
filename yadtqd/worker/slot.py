"""One execution slot: its process, the three one-way pipes between it and the worker, and the
jobs it holds; how its process is started and stopped, and how it ended, in words.

The pipes (why pings have one of their own: :mod:`yadtqd.worker.child`): one brings the process
its jobs, one its pings, and one carries everything it sends back. The process leads its own
process group, so :func:`stop` ends what its task started too.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess

from yadtqd.worker import child
from yadtqd.worker.child import Job


@dataclass
class Slot:
    """One execution process and the job it runs, if any."""

    process: BaseProcess
    #: Its answers to pings, readiness and outcomes back (why pings have a pipe of their own:
    #: :mod:`yadtqd.worker.child`).
    conn: Connection
    #: Pings to the process.
    pings: Connection
    #: Jobs to the process.
    jobs: Connection
    generation: int
    ready: bool = False
    #: The job running (or next to run) in the process, if any.
    job: Job | None = None
    #: The jobs of its batch after :attr:`job`, not yet started (they run in this order).
    queue: list[Job] = field(default_factory=list)
    #: When the jobs of its batch may start no more (monotonic), if it was given one.
    start_by: float = 0.0
    #: Jobs of its batch taken back past :attr:`start_by` whose "not started" has not come yet:
    #: the slot takes no new job before (their answers are matched by the job that runs).
    unreported: int = 0
    deadline: float | None = None
    last_answer: float = 0.0
    #: When the running job was given to it (monotonic).
    began: float = 0.0
    #: The job is being stopped for an operator's cancel.
    cancelled: bool = False


def spawn(ctx: SpawnContext, generation: int, max_result_bytes: int, plugins: tuple[str, ...],
          max_memory: int, open_files: int) -> Slot:
    """Start an execution process, keeping the worker's end of each pipe (the process becomes
    ready once its plugins load: :mod:`~yadtqd.worker.child`)."""
    pings_read, pings_write = ctx.Pipe(duplex=False)
    answers_read, answers_write = ctx.Pipe(duplex=False)
    jobs_read, jobs_write = ctx.Pipe(duplex=False)
    process = ctx.Process(target=child.main,
                          args=(pings_read, answers_write, jobs_read, max_result_bytes, plugins,
                                max_memory, open_files),
                          name="yadtq-exec", daemon=True)
    process.start()
    for end in (pings_read, answers_write, jobs_read):
        end.close()
    return Slot(process, answers_read, pings_write, jobs_write, generation,
                last_answer=time.monotonic())


def stop(slot: Slot) -> None:
    """End a slot's process group (the task and everything it started), then the process."""
    pid = slot.process.pid
    if pid is not None:
        try:
            os.killpg(pid, signal.SIGKILL)  # the process leads its own group
        except (ProcessLookupError, PermissionError):
            pass  # not yet its own group (just spawned), or gone
    if slot.process.is_alive():
        slot.process.kill()
    slot.process.join()
    close_pipes(slot)


def close_pipes(slot: Slot) -> None:
    """Close the worker's ends of a slot's pipes."""
    for end in (slot.jobs, slot.pings, slot.conn):
        end.close()


def death(process: BaseProcess) -> str:
    """How an execution process ended, in words (``exited with status 3``, ``was killed by
    signal SIGSEGV``)."""
    process.join(1.0)
    code = process.exitcode
    if code is None:
        return "closed its pipe"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
