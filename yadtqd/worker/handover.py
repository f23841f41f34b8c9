"""Handing runs to the execution pool, in batches (:mod:`yadtqd.worker.pool`): what is handed,
what comes back unstarted, and when a run is said to have started (the ``started`` event and the
trail's line)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from yadtqd import messages as m
from yadtqd.worker.child import Job
from yadtqd.worker.lease import Lease
from yadtqd.worker.pending import Pending, next_batch
from yadtqd.worker.pool import Pool

log = logging.getLogger("yadtqd.worker")

#: Seconds a task runs before its ``started`` is sent: a task that ends sooner says both in its
#: ``finished`` (issue 15: one event, one changelog record and one SQL update fewer per short
#: task). The server sees it ``processing`` that much later; nothing else depends on it
#: (DESIGN 4: a new attempt follows a death, not a missing ``started``).
ANNOUNCE_AFTER = 0.02


class Handover:
    """The hand-over's steps, mixed into :class:`yadtqd.worker.main.Worker` (whose state they
    use)."""

    pool: Pool
    lease: Lease
    pending: Pending
    handed: dict[tuple[str, int], m.Run]
    deferred: dict[tuple[str, int], m.Cancel]
    unannounced: dict[tuple[str, int], tuple[m.Started, float]]
    unlogged: set[tuple[str, int]]
    worker_id: str
    epoch: str
    stopping: bool

    if TYPE_CHECKING:  # the worker's and the graceful stop's: no stub here to shadow them
        def _send(self, message: m.WorkerEvent, urgent: bool = False) -> None: ...

        def _on_cancel(self, cancel: m.Cancel) -> None: ...

        def _send_bye(self, runs: list[m.Run], confirm: bool = False) -> None: ...

    def _start_pending(self) -> None:
        if self.pending and not self.lease.may_start(time.monotonic()):
            return  # this epoch cannot prove it is live: the server may have re-queued these
        while self.pending and self.pool.free and not self.stopping:
            runs = next_batch(self.pending, self.pool.free, self.pool.short)
            jobs = [Job(task_id=r.task_id, attempt=r.attempt, task=r.task, args=r.args,
                        kwargs=r.kwargs, worker=self.worker_id, epoch=r.epoch) for r in runs]
            self.pool.submit(jobs if len(jobs) > 1 else jobs[0], runs[0].options.timeout,
                             self.lease.horizon())
            for run in runs:
                self.handed[(run.task_id, run.attempt)] = run
                self.unannounced[(run.task_id, run.attempt)] = (
                    m.Started(worker=self.worker_id, epoch=run.epoch, ts=time.time(),
                              task_id=run.task_id, attempt=run.attempt),
                    time.monotonic() + ANNOUNCE_AFTER)
            started_line(runs[0].task_id, runs[0].attempt)  # the others wait behind it
            self.unlogged.update((run.task_id, run.attempt) for run in runs[1:])

    def _log_started(self) -> None:
        """Log "started" for the runs of batches now at the front of their slot. A run at the
        front may still come back unstarted (its batch's time to start passed first):
        :meth:`_take_back` then says so."""
        if self.unlogged:
            waiting = self.pool.waiting()
            for key in [key for key in self.unlogged if key not in waiting]:
                self.unlogged.discard(key)
                started_line(*key)

    def _take_back(self) -> None:
        """Runs of a batch that never started (a task before them ended their process, or the
        batch's time to start passed) start again as never run: first among those of their
        priority (handed back when stopping)."""
        keys = [job.key for job in self.pool.take_returned()]
        logged = {key for key in keys if key not in self.unlogged}  # said to have started
        self.unlogged.difference_update(keys)
        back = [r for key in keys if (r := self.handed.pop(key, None)) and r.epoch == self.epoch]
        for run in back:
            if (run.task_id, run.attempt) in logged:
                log.info("task %s attempt %d did not start: its batch's time to start had passed;"
                         " it runs again", run.task_id, run.attempt,
                         extra={"task_id": run.task_id, "event": "task_not_started"})
        back.sort(key=lambda r: (-r.priority, r.grant or 0))  # as they were granted
        for key in keys:
            self.unannounced.pop(key, None)
        self.pending.put_back(back)
        for cancel in [self.deferred.pop(key) for key in list(self.deferred)]:
            self._on_cancel(cancel)  # one that came back is in pending now: never started
        back = [r for r in back if r in self.pending]
        if back and self.stopping:
            self._send_bye(back)  # as a run that comes while stopping
            for run in back:
                self.pending.remove(run)

    def _announce(self, every: bool = False) -> None:
        """Send the ``started`` of the tasks running for :data:`ANNOUNCE_AFTER` (or of all)."""
        mono = time.monotonic()
        waiting = self.pool.waiting() if self.unannounced else set()  # in batches: not yet
        for key, (started, due) in list(self.unannounced.items()):
            if not every and due > mono:
                return
            if key not in waiting:
                del self.unannounced[key]
                if started.epoch == self.epoch:
                    self._send(started)


def started_line(task_id: str, attempt: int) -> None:
    """The trail's "started" line of a run."""
    log.info("task %s attempt %d started", task_id, attempt,
             extra={"task_id": task_id, "event": "task_started"})
