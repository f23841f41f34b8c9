"""The worker's graceful stop (SIGTERM): hand back what has not started, say ``bye``, drain
what runs, and end once the server confirmed the leave (or could not within a takeover's time,
or the stop timeout passed)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from yadtqd import messages as m
from yadtqd.config import Config
from yadtqd.systemd import Notifier
from yadtqd.worker.lease import Lease
from yadtqd.worker.outbox import Outbox
from yadtqd.worker.pending import Pending
from yadtqd.worker.placement import Placement
from yadtqd.worker.pool import Pool

log = logging.getLogger("yadtqd.worker")


class GracefulStop:
    """The stop's steps, mixed into :class:`yadtqd.worker.main.Worker` (whose state they use)."""

    config: Config
    notifier: Notifier
    lease: Lease
    pool: Pool
    placement: Placement
    pending: Pending
    worker_id: str
    epoch: str
    stop_deadline: float
    confirm_by: float
    leave_confirmed: bool
    outbox: Outbox | None

    if TYPE_CHECKING:  # the worker's: no stub here to shadow it
        def _send(self, message: m.WorkerEvent, urgent: bool = False) -> None: ...

    def _begin_stop(self) -> None:
        self.notifier.stopping()
        mono = time.monotonic()
        self.stop_deadline = mono + self.config.worker.stop_timeout
        # long enough for a standby to take over and answer (a stop during a failover)
        self.confirm_by = mono + self.config.server.session_timeout + (
            self.lease.timeout or self.config.server.heartbeat_timeout)
        handed = list(self.pending)
        self.pending.clear()
        self._send_bye(handed, confirm=True)
        log.info("stopping: handed back %d unstarted tasks, draining %d running",
                 len(handed), len(self.pool.running()), extra={"worker_id": self.worker_id,
                                                      "event": "worker_stopping"})

    def _send_bye(self, runs: list[m.Run], confirm: bool = False) -> None:
        """Hand these runs back in one ``bye``, or in several of
        :data:`~yadtqd.messages.events.REFS_MOST` each:
        the server applies them in order, so the last one alone asks for the answer (the
        ``left`` then follows them all); one producer keeps them in order, and the last one's
        urgency sends them all at once."""
        refs = [m.TaskRef(task_id=r.task_id, attempt=r.attempt) for r in runs]
        parts = [refs[i:i + m.REFS_MOST] for i in range(0, len(refs), m.REFS_MOST)] or [[]]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            self._send(m.Bye(worker=self.worker_id, epoch=self.epoch, ts=time.time(),
                             handed_back=part, confirm=confirm and last,
                             dispatch_partition=self.placement.dispatch_partition), urgent=last)

    def _stopped(self, mono: float) -> bool:
        """The drain is over: nothing runs and the server confirmed the ``bye`` (every run it
        granted meanwhile was handed back) and no part of it waits to be sent again, or it did
        not within a takeover's time (the session and heartbeat timeouts), or the stop timeout
        passed."""
        if mono >= self.stop_deadline:
            return True
        handed = self.outbox is None or not self.outbox.bye_to_resend(self.epoch)
        return self.pool.busy == 0 and (self.leave_confirmed and handed or mono >= self.confirm_by)

    def _end_stop(self) -> None:
        left = len(self.pool.running())
        if left:
            log.warning("stop timeout: %d tasks still running are abandoned to the server", left)
        elif not self.leave_confirmed:
            log.warning("no server confirmed this worker's leave (none active, or one older than"
                        " this worker): a task granted meanwhile is re-queued once the server"
                        " declares epoch %s dead", self.epoch,
                        extra={"worker_id": self.worker_id, "event": "worker_unconfirmed"})
        log.info("stopped", extra={"worker_id": self.worker_id, "event": "worker_left"})
