"""A worker's heartbeat fits any ``events`` topic the server accepts, however many runs its
execution processes hold (``[worker] slots`` in the hundreds, eight runs a slot in batches)."""

from __future__ import annotations

import time

from yadtqd import messages as m
from yadtqd.config import Config, WorkerConfig
from yadtqd.messages.common import ENVELOPE_BYTES
from yadtqd.systemd import Notifier
from yadtqd.worker.child import Job
from yadtqd.worker.main import Worker
from yadtqd.worker.pool import BATCH_MOST
from yadtqd.worker.slot import Slot


class Recorder:
    """The outbox, recording what the worker sends."""

    def __init__(self) -> None:
        self.sent: list[m.WorkerEvent] = []
        self.undelivered = 0

    def send(self, message: m.WorkerEvent, urgent: bool = False) -> None:
        self.sent.append(message)


def _job(slot: int, place: int) -> Job:
    """A run with a task id of the longest kind (128 characters)."""
    return Job(task_id=f"{slot:064d}{place:064d}", attempt=1, task="add", args=[1, 2], kwargs={},
               worker="w", epoch="e1")


def _busy_slot(index: int) -> Slot:
    """A slot running one run with a full batch behind it (no process: the heartbeat reads only
    what the pool holds)."""
    job, *queue = [_job(index, place) for place in range(BATCH_MOST)]
    return Slot(process=None, conn=None, pings=None, jobs=None,  # type: ignore[arg-type]
                generation=0, ready=True, job=job, queue=queue, last_answer=time.monotonic())


def test_a_heartbeat_of_a_worker_holding_thousands_of_runs_fits_the_least_room() -> None:
    slots = 500
    worker = Worker(Config(kafka={}, worker=WorkerConfig(id="w", slots=slots)), Notifier())
    worker.epoch = worker.hello_delivered = "e1"
    worker.outbox = outbox = Recorder()  # type: ignore[assignment]
    worker.pool.slots = [_busy_slot(i) for i in range(slots)]
    worker._beat()
    (beat,) = outbox.sent
    assert isinstance(beat, m.Heartbeat)
    assert beat.busy == slots and len(beat.running) == m.REFS_MOST
    # the runs listed are those running, before any waiting in a batch behind them
    assert [r.task_id for r in beat.running] == [_job(i, 0).task_id for i in range(m.REFS_MOST)]
    # with the smallest result allowed, an events topic holds ENVELOPE_BYTES and a little more
    assert len(m.encode(beat)) < ENVELOPE_BYTES


def test_a_heartbeat_of_a_small_worker_lists_every_run_it_holds() -> None:
    worker = Worker(Config(kafka={}, worker=WorkerConfig(id="w", slots=2)), Notifier())
    worker.epoch = worker.hello_delivered = "e1"
    worker.outbox = outbox = Recorder()  # type: ignore[assignment]
    worker.pool.slots = [_busy_slot(i) for i in range(2)]
    worker._beat()
    (beat,) = outbox.sent
    assert isinstance(beat, m.Heartbeat) and beat.busy == 2
    assert [r.task_id for r in beat.running] == (
        [_job(i, 0).task_id for i in range(2)]
        + [_job(i, place).task_id for i in range(2) for place in range(1, BATCH_MOST)])
