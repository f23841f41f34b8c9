"""The worker's side of ``events``: everything it tells the server, in order, delivered.

Events go through one producer, which batches (``linger.ms``, :data:`LINGER_MS` unless the
``[kafka]`` section says otherwise), so a busy worker sends few, full requests. An *urgent*
event (``hello``, ``bye``), and the outcomes sent before a turn that ends with nothing granted
waiting to start (:meth:`Outbox.push`), go out at once: librdkafka ignores the linger while it
flushes. That flush waits for Kafka's acknowledgement (about a millisecond here, at most
:data:`URGENT_WAIT`): the loop then holds no task to start, only outcomes of its other slots to
collect; it saves a lone task's result, and the grant that fills a slot left idle, the batching
delay. One producer keeps the events in the order they happened.

Every delivery report is read. A ``hello``, ``started``, ``finished`` or ``bye`` that failed (a
broker outage longer than ``message.timeout.ms``) is logged at error, counted, and sent again
while its epoch is the current one; a heartbeat is not (the next one says more), but its report
feeds the :class:`Lease`. An event Kafka can never take (too large) fails its task instead: the
worker goes on. A fatal producer error ends the worker (systemd starts it again), and so does a
producer left knowing no broker (:class:`~yadtqd.transport.ConnectionMonitor`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec
from confluent_kafka import KafkaError, Message

from yadtqd import messages as m
from yadtqd import transport
from yadtqd.config import Config
from yadtqd.errors import UnreachableError
from yadtqd.worker.lease import Lease

log = logging.getLogger("yadtqd.worker")

#: The longest an urgent event holds the worker's loop waiting for Kafka's acknowledgement.
URGENT_WAIT = 0.01
#: How long a busy worker's events wait to share a request (issue 15). Two busy workers' librdkafka
#: threads took 105 µs of CPU a task each with 1 ms, about 60 with 5 ms and about 12 with 20 ms,
#: and the broker's request threads about a quarter less again (``bench/cpu.py --threads``; one
#: sitting, docs/bench.md). Only a worker whose prefetch still holds tasks waits so: its slots
#: have work meanwhile, and the adaptive prefetch holds far more than 20 ms of it (the server's
#: horizon is 100 ms a slot). Once nothing granted waits to start, the turn's outcomes are pushed
#: out at once (:meth:`Outbox.push`), so a lone task, and a slot left idle, pay none of it. A
#: worker frozen or killed may so hold up to 20 ms of outcomes not yet sent: their tasks run
#: again after its death, as tasks it was running do (the frozen-worker test counts them apart).
LINGER_MS = 20
#: Seconds between two rounds of sending again what failed.
RESEND_EVERY = 1.0
_TOO_LARGE = {KafkaError.MSG_SIZE_TOO_LARGE}


class Outbox:
    """Sends a worker's events to its ``events`` partition, in order, until delivered."""

    def __init__(self, config: Config, worker_id: str, partition: int, lease: Lease,
                 current_epoch: Callable[[], str],
                 on_hello_delivered: Callable[[str], None] = lambda epoch: None) -> None:
        self.topic = config.topic("events")
        self.worker_id = worker_id
        self.partition = partition
        self.lease = lease
        self.current_epoch = current_epoch
        self.on_hello_delivered = on_hello_delivered
        self.producer, self.monitor = transport.make_producer(config, "worker", linger_ms=LINGER_MS)
        #: Events whose delivery failed, to send again (with why); events Kafka will never take.
        self.failed: list[tuple[m.WorkerEvent, str]] = []
        self.refused: list[tuple[m.WorkerEvent, str]] = []
        self.undelivered = 0
        self.fatal = ""
        self._last_resend = 0.0
        #: The epoch of the newest ``hello``, until it is acknowledged: pushed again at every
        #: poll until then (the producer of a worker just started may not be connected when it
        #: is first pushed).
        self._hello_unacked = ""

    def send(self, message: m.WorkerEvent, urgent: bool = False) -> None:
        """Queue an event; ``urgent`` pushes it (and all before it) out now."""
        seq = 0
        if isinstance(message, m.Hello):
            self._hello_unacked = message.epoch
        if isinstance(message, m.Heartbeat):
            seq = self.lease.sent(time.monotonic())
            if self.lease.broken:
                message = msgspec.structs.replace(message, probe=seq)
        problem = transport.send(self.producer, self.topic, m.encode(message), self.worker_id,
                                 self.partition, self._report(message, seq))
        if problem:
            self.undelivered += 1
            (self.refused if transport.TOO_LARGE in problem else self.failed).append((message, problem))
        elif urgent:
            self.push()

    def push(self) -> None:
        """Send what is queued now, ignoring the linger (librdkafka does only while a flush
        waits); wait at most :data:`URGENT_WAIT` for Kafka's acknowledgement."""
        self.producer.flush(URGENT_WAIT)

    def poll(self) -> None:
        """Serve delivery reports; send again what failed (at most once a second), and a small
        failure in place of a task's outcome Kafka will never take.

        Raises :class:`UnreachableError` after a fatal producer error (the idempotent producer
        cannot go on), or once the producer knows no broker any more (it would never connect
        again): the daemon exits and systemd starts it again.
        """
        self.producer.poll(0)
        if self._hello_unacked:  # its push ended before the producer had connected
            self.push()
        if self.fatal:
            raise UnreachableError(f"the Kafka producer failed for good: {self.fatal}")
        if self.monitor.orphaned:
            raise UnreachableError("the Kafka producer knows no broker any more (see the log above)")
        refused, self.refused = self.refused, []
        for message, problem in refused:
            self._never(message, problem)
        mono = time.monotonic()
        if not self.failed or mono - self._last_resend < RESEND_EVERY:
            return
        self._last_resend = mono
        failed, self.failed = self.failed, []
        epoch = self.current_epoch()
        again = [msg for msg, _ in failed if msg.epoch == epoch]  # an older epoch's are stale
        log.error("%d events were not delivered to Kafka (%s); sending %d again", len(failed),
                  failed[-1][1], len(again), extra={"event": "undelivered"})
        for message in again:
            self.send(message)

    def bye_to_resend(self, epoch: str) -> bool:
        """Whether a ``bye`` of this epoch failed and waits to be sent again: a part handed
        back before the last one, which Kafka may have taken meanwhile (its ``left`` answered)."""
        return any(isinstance(msg, m.Bye) and msg.epoch == epoch for msg, _ in self.failed)

    def flush(self, timeout: float) -> None:
        """Deliver what was accepted (at shutdown)."""
        transport.flush(self.producer, timeout)

    def _report(self, message: m.WorkerEvent, seq: int) -> transport.OnDelivery:
        """The delivery callback of one event. It only records: librdkafka serves it from
        inside ``poll`` or ``flush``, where producing again must not happen."""
        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if isinstance(message, m.Heartbeat):
                self.lease.acked(seq, err is None, time.monotonic())
            elif err is None:
                if isinstance(message, m.Hello):
                    if message.epoch == self._hello_unacked:
                        self._hello_unacked = ""
                    self.on_hello_delivered(message.epoch)
                return
            if err is None:
                return
            if err.fatal():
                self.fatal = err.str()
            if isinstance(message, m.Heartbeat):
                return  # the next heartbeat says more
            self.undelivered += 1
            (self.refused if err.code() in _TOO_LARGE else self.failed).append((message, err.str()))

        return delivered

    def _never(self, message: m.WorkerEvent, problem: str) -> None:
        """An event Kafka will never take. A task's outcome is replaced by a small failure that
        says why; anything else is logged and left out."""
        log.error("%s event cannot be sent to Kafka: %s", type(message).__name__.lower(), problem,
                  extra={"task_id": getattr(message, "task_id", None), "event": "undelivered"})
        if isinstance(message, m.Hello) and message.epoch == self._hello_unacked:
            self._hello_unacked = ""  # never pushed out: no push again at every poll
        if isinstance(message, m.Finished) and (message.error is None or message.error.type != "EventTooLarge"):
            error = m.ErrorInfo(type="EventTooLarge", message=(
                f"the task's outcome could not be sent to Kafka ({problem}); lower"
                " [worker] max_result_bytes or raise the broker's limits"))
            self.send(msgspec.structs.replace(message, status="failed", result=msgspec.Raw(b"null"),
                                              error=error), urgent=True)
