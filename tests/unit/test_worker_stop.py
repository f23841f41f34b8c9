"""A stopping worker's end (docs/design.md, "Graceful stop"): it exits only once it drained and
the server confirmed its ``bye`` with ``left``, handing back every run that reaches it before."""

from __future__ import annotations

import time

import msgspec
from confluent_kafka import Message

from yadtqd import messages as m
from yadtqd.config import Config, WorkerConfig
from yadtqd.messages.common import ENVELOPE_BYTES
from yadtqd.systemd import Notifier
from yadtqd.worker.main import Worker
from yadtqd.worker.outbox import Outbox


class Recorder:
    """The outbox, recording what the worker sends; ``failed`` as the outbox keeps what waits
    to be sent again."""

    bye_to_resend = Outbox.bye_to_resend

    def __init__(self) -> None:
        self.sent: list[m.WorkerEvent] = []
        self.failed: list[tuple[m.WorkerEvent, str]] = []

    def send(self, message: m.WorkerEvent, urgent: bool = False) -> None:
        self.sent.append(message)


def _stopping_worker(pending: int = 0) -> tuple[Worker, Recorder]:
    worker = Worker(Config(kafka={}, worker=WorkerConfig(id="w", slots=1)), Notifier())
    worker.epoch, worker.placement.dispatch_partition = "e1", 3
    worker.outbox = outbox = Recorder()  # type: ignore[assignment]
    worker.pending.extend(m.Run(worker="w", epoch="e1", task_id=f"{i:0128d}", attempt=1 + i % 3,
                                task="add", grant=i + 1) for i in range(pending))
    worker.stopping = True
    worker._begin_stop()
    return worker, outbox


def _dispatch(order: msgspec.Struct) -> Message:
    return Message(topic="yadtq.dispatch", partition=3, offset=0, value=m.encode(order))


def test_a_drained_worker_waits_for_left_and_hands_back_what_arrives_before() -> None:
    worker, outbox = _stopping_worker()
    (bye,) = outbox.sent
    assert isinstance(bye, m.Bye) and bye.confirm and bye.dispatch_partition == 3
    assert not worker._stopped(time.monotonic())  # nothing runs, but the server has not answered
    worker._on_dispatch(_dispatch(m.Run(worker="w", epoch="e1", task_id="t1", attempt=1,
                                        task="add", grant=1)))
    handed = outbox.sent[-1]
    assert isinstance(handed, m.Bye) and [r.task_id for r in handed.handed_back] == ["t1"]
    assert not handed.confirm
    assert not worker._stopped(time.monotonic())
    worker._on_dispatch(_dispatch(m.Left(worker="w", epoch="e0")))  # an older epoch's answer
    assert not worker._stopped(time.monotonic())
    worker._on_dispatch(_dispatch(m.Left(worker="w", epoch="e1")))
    assert worker._stopped(time.monotonic())


def test_a_deep_pipeline_goes_back_in_byes_that_fit_any_events_topic_the_server_accepts() -> None:
    """An ``events`` topic is only sure to take a result plus ENVELOPE_BYTES, and an epoch may
    hold thousands of unstarted grants: they go back in several ``bye``, the last one confirmed."""
    _, outbox = _stopping_worker(pending=1_100)
    byes = [b for b in outbox.sent if isinstance(b, m.Bye)]
    assert len(byes) == len(outbox.sent) == 5
    assert all(len(m.encode(b)) < ENVELOPE_BYTES for b in byes)
    assert [b.confirm for b in byes] == [False] * 4 + [True]
    refs = [(r.task_id, r.attempt) for b in byes for r in b.handed_back]
    assert refs == [(f"{i:0128d}", 1 + i % 3) for i in range(1_100)]


def test_a_part_of_the_bye_to_send_again_holds_the_exit_though_left_came() -> None:
    """A part that failed is sent again up to a second later; the last part, which asked for
    the answer, may have gone meanwhile. Exiting on that ``left`` would leave the failed part's
    tasks with the epoch until it is declared dead."""
    worker, outbox = _stopping_worker(pending=300)
    first = outbox.sent[0]
    assert isinstance(first, m.Bye) and not first.confirm
    outbox.failed.append((first, "Local: Message timed out"))
    worker._on_dispatch(_dispatch(m.Left(worker="w", epoch="e1")))
    assert worker.leave_confirmed and not worker._stopped(time.monotonic())
    outbox.failed.clear()  # sent again
    assert worker._stopped(time.monotonic())


def test_without_an_answer_the_worker_stops_after_a_takeover_s_time() -> None:
    worker, _ = _stopping_worker()
    server = worker.config.server
    waited = server.session_timeout + server.heartbeat_timeout
    assert not worker._stopped(time.monotonic() + waited - 1)
    assert worker._stopped(time.monotonic() + waited + 0.01)


def test_a_fence_while_stopping_ends_the_wait() -> None:
    worker, _ = _stopping_worker()
    worker._on_dispatch(_dispatch(m.Fenced(worker="w", epoch="e1", reason="no heartbeat")))
    assert worker._stopped(time.monotonic())
