"""The server's side of ``dispatch`` (``run``, ``fenced``, ``alive``, ``refused`` to worker
epochs), and its markers on ``events`` (:mod:`yadtqd.server.evidence`).

Two producers share the topic. Grants that will wait in a worker's prefetch behind other tasks
go through a batching producer (``linger.ms``, 1 ms by default), so a busy cluster sends few,
full requests. A grant a free slot is waiting for goes through a producer that sends at once,
so a lone task is not held back by the batching. The order between the two does not matter:
every message names its epoch and attempt, and a worker drops repeats (invariant 5).

Every message that matters is delivered or given up for a reason: a delivery report with an
error (a broker outage longer than ``message.timeout.ms``, say) is logged at error, counted,
and the message is sent again, a ``run`` only while its grant is still current and unstarted.
Markers are not sent again: a lost marker is itself the evidence of trouble.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import msgspec
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from yadtqd import messages as m
from yadtqd import transport
from yadtqd.config import Config
from yadtqd.server.evidence import Evidence
from yadtqd.store import Grant

log = logging.getLogger("yadtqd.server")

_payload = msgspec.json.Decoder(tuple[str, list, dict, m.Options])  # type: ignore[type-arg]
#: Seconds between two rounds of sending again what failed.
RESEND_EVERY = 1.0


@dataclass(frozen=True)
class Undelivered:
    """A dispatch message whose delivery failed, to be sent again."""

    worker: str
    epoch: str
    partition: int
    value: bytes
    #: For a ``run``: (task id, attempt), sent again only while that grant is unstarted.
    grant: tuple[str, int] | None
    problem: str


class Dispatcher:
    """Produces runs and fences to each worker's ``dispatch`` partition."""

    def __init__(self, config: Config, partitions: int, evidence: Evidence) -> None:
        self.topic = config.topic("dispatch")
        self.events_topic = config.topic("events")
        self.partitions = partitions
        self.lease = config.server.heartbeat_timeout
        self.evidence = evidence
        self.batching, _ = transport.make_producer(config, "server")
        self.express, _ = transport.make_producer(config, "server-express", linger_ms=0)
        self.failed: list[Undelivered] = []
        self.undelivered = 0
        self._last_resend = 0.0
        self._stale_metadata = False
        #: The last reason a marker could not be written (for the warning about unproven
        #: partitions).
        self.marker_problem = ""

    def route(self, worker: str, partition: int = -1) -> int:
        """The ``dispatch`` partition an epoch reads: the one it said in its ``hello``, else
        (workers older than that) the hash of its id."""
        return partition if partition >= 0 else transport.partition_for(worker, self.partitions)

    def runs(self, grants: list[Grant], routes: Mapping[str, int],
             urgent: Collection[str] = ()) -> None:
        """Send a ``run`` for every grant, to the partition ``routes`` gives for its epoch; at
        once for the epochs in ``urgent``."""
        for grant in grants:
            task, args, kwargs, options = _payload.decode(grant.payload)
            run = m.Run(worker=grant.worker, epoch=grant.epoch, task_id=grant.task_id,
                        attempt=grant.attempt, task=task, args=args, kwargs=kwargs, options=options,
                        lease=self.lease, grant=grant.grant_no or None)
            producer = self.express if grant.epoch in urgent else self.batching
            self._send(producer, grant.worker, grant.epoch, self.route(grant.worker, routes.get(grant.epoch, -1)),
                       m.encode(run), (grant.task_id, grant.attempt))
            # debug: the worker logs "started" at info, which names it; DESIGN 9's trail
            # (received, started, succeeded or failed) does not need a third server line a task
            log.debug("task %s attempt %d granted to %s", grant.task_id, grant.attempt,
                      grant.worker, extra={"task_id": grant.task_id, "worker_id": grant.worker,
                                           "event": "task_granted"})

    def fence(self, worker: str, epoch: str, partition: int, reason: str) -> None:
        """Tell an epoch it was declared dead."""
        self._send(self.express, worker, epoch, self.route(worker, partition),
                   m.encode(m.Fenced(worker=worker, epoch=epoch, reason=reason)))

    def alive(self, worker: str, epoch: str, partition: int, probe: int) -> None:
        """Answer a heartbeat that asked whether its epoch is live: it is."""
        self._send(self.express, worker, epoch, self.route(worker, partition),
                   m.encode(m.Alive(worker=worker, epoch=epoch, probe=probe)))

    def refuse(self, worker: str, epoch: str, partition: int, reason: str) -> None:
        """Tell a new epoch that its ``hello`` was refused."""
        self._send(self.express, worker, epoch, self.route(worker, partition),
                   m.encode(m.Refused(worker=worker, epoch=epoch, reason=reason)))

    def mark(self, partition: int, nonce: str, mono: float) -> None:
        """Write a marker to one ``events`` partition (see :mod:`yadtqd.server.evidence`)."""
        seq = self.evidence.sent(partition, mono)
        value = m.encode(m.Mark(server=nonce, seq=seq, ts=time.time()))

        def delivered(err: KafkaError | None, msg: Message) -> None:
            self.evidence.acked(partition, seq, err is None, time.monotonic(), msg.latency())
            if err is not None:
                self.marker_problem = f"{self.events_topic}[{partition}]: {err.str()}"

        problem = transport.send(self.express, self.events_topic, value, nonce, partition, delivered)
        if problem:
            self._stale_metadata = True
            self.marker_problem = f"{self.events_topic}[{partition}]: {problem}"
            self.evidence.acked(partition, seq, False, mono)

    def poll(self) -> None:
        """Serve delivery reports and errors."""
        self.batching.poll(0)
        self.express.poll(0)

    def resend(self, still_granted: Callable[[str, str, int], bool]) -> None:
        """Send again what failed to deliver (at most once a second). A ``run`` is sent again
        only while ``still_granted(task_id, epoch, attempt)``."""
        mono = time.monotonic()
        if not (self.failed or self._stale_metadata) or mono - self._last_resend < RESEND_EVERY:
            return
        self._last_resend = mono
        if self._stale_metadata:  # learn partitions added to the topics since
            self._stale_metadata = False
            for producer in (self.express, self.batching):
                with contextlib.suppress(KafkaException):
                    producer.list_topics(self.topic, timeout=1.0)
                    producer.list_topics(self.events_topic, timeout=1.0)
        failed, self.failed = self.failed, []
        if failed:
            log.error("%d dispatch messages were not delivered to Kafka (%s); sending them again",
                      len(failed), failed[-1].problem, extra={"event": "undelivered"})
        for item in failed:
            if item.grant is None or still_granted(item.grant[0], item.epoch, item.grant[1]):
                self._send(self.batching, item.worker, item.epoch, item.partition, item.value,
                           item.grant)

    def take_undelivered(self) -> int:
        """How many messages failed to deliver since the last call (for the counters)."""
        count, self.undelivered = self.undelivered, 0
        return count

    def flush(self, timeout: float) -> None:
        """Deliver what was accepted (at shutdown)."""
        transport.flush(self.batching, timeout)
        transport.flush(self.express, timeout)

    def _send(self, producer: Producer, worker: str, epoch: str, partition: int, value: bytes,
              grant: tuple[str, int] | None = None) -> None:
        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                self.undelivered += 1
                self.failed.append(Undelivered(worker, epoch, partition, value, grant, err.str()))

        problem = transport.send(producer, self.topic, value, worker, partition, delivered)
        if problem is None:
            return
        self.undelivered += 1
        if transport.TOO_LARGE in problem:  # never sendable: nothing to send again
            log.error("dispatch message for %s epoch %s cannot be sent: %s", worker, epoch, problem,
                      extra={"worker_id": worker, "event": "undelivered"})
            return
        # most likely a partition added since the producer last read the topic's metadata
        self._stale_metadata = True
        self.failed.append(Undelivered(worker, epoch, partition, value, grant, problem))
