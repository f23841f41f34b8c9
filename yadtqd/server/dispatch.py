"""The server's side of ``dispatch`` (``run``, ``cancel``, ``fenced``, ``alive``, ``left``,
``placed``, ``refused`` to worker epochs), and its markers on ``events`` (:mod:`yadtqd.server.evidence`).

Dispatch messages go into the turn's Kafka transaction (:mod:`yadtqd.server.replication`), with
the changelog records of the grants and deaths they announce: a worker, reading ``dispatch``
with ``read_committed``, sees a ``run`` only once its grant is in the changelog, and a message
of an aborted transaction is sent again in the next. Every message names its epoch and attempt,
and a worker drops repeats (invariant 5).

Markers are not state: they go through a producer of their own that sends at once, outside any
transaction, and are not sent again: a lost marker is itself the evidence of trouble.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Mapping

import msgspec
from confluent_kafka import KafkaError, KafkaException, Message

from yadtqd import messages as m
from yadtqd import transport
from yadtqd.config import Config
from yadtqd.server.evidence import Evidence
from yadtqd.server.replication import Changelog
from yadtqd.store import Grant

log = logging.getLogger("yadtqd.server")

_payload = msgspec.json.Decoder(tuple[str, list, dict, m.Options])  # type: ignore[type-arg]


class Dispatcher:
    """Queues runs and fences for each worker's ``dispatch`` partition; writes markers."""

    def __init__(self, config: Config, partitions: int, evidence: Evidence, out: Changelog) -> None:
        self.topic = config.topic("dispatch")
        self.events_topic = config.topic("events")
        self.partitions = partitions
        self.lease = config.server.heartbeat_timeout
        self.evidence = evidence
        self.out = out
        self.express, self.monitor = transport.make_producer(config, "server-markers", linger_ms=0)
        self._stale_metadata = False
        self._last_refresh = 0.0
        #: The last reason a marker could not be written (for the warning about unproven
        #: partitions).
        self.marker_problem = ""

    def route(self, worker: str, partition: int = -1) -> int:
        """The ``dispatch`` partition an epoch reads: the one it said in its ``hello``, else
        (workers older than that) the hash of its id."""
        return partition if partition >= 0 else transport.partition_for(worker, self.partitions)

    def runs(self, grants: list[Grant], routes: Mapping[str, int]) -> None:
        """A ``run`` for every grant, to the partition ``routes`` gives for its epoch."""
        for grant in grants:
            task, args, kwargs, options = _payload.decode(grant.payload)
            run = m.Run(worker=grant.worker, epoch=grant.epoch, task_id=grant.task_id,
                        attempt=grant.attempt, task=task, args=args, kwargs=kwargs, options=options,
                        lease=self.lease, grant=grant.grant_no or None,
                        priority=grant.priority)
            self._send(grant.worker, self.route(grant.worker, routes.get(grant.epoch, -1)), m.encode(run))
            # debug: the worker logs "started" at info, which names it; DESIGN 9's trail
            # (received, started, succeeded or failed) does not need a third server line a task
            log.debug("task %s attempt %d granted to %s", grant.task_id, grant.attempt,
                      grant.worker, extra={"task_id": grant.task_id, "worker_id": grant.worker,
                                           "event": "task_granted"})

    def prime(self, partitions: Iterable[int]) -> None:
        """Open the next transaction now, with placeholders on these ``dispatch`` partitions
        (those of the epochs that may take a grant): a grant to any of them then goes out with
        one commit."""
        self.out.prime((self.topic, p) for p in sorted(set(partitions)) if 0 <= p < self.partitions)

    def fence(self, worker: str, epoch: str, partition: int, reason: str) -> None:
        """Tell an epoch it was declared dead."""
        self._send(worker, self.route(worker, partition),
                   m.encode(m.Fenced(worker=worker, epoch=epoch, reason=reason)))

    def cancel(self, worker: str, epoch: str, partition: int, task_id: str, attempt: int,
               grant: int | None) -> None:
        """Tell the epoch holding a task that an operator cancelled it."""
        self._send(worker, self.route(worker, partition),
                   m.encode(m.Cancel(worker=worker, epoch=epoch, task_id=task_id, attempt=attempt,
                                     grant=grant)))

    def answer(self, worker: str, partition: int,
               message: m.Alive | m.Left | m.Placed | m.Refused) -> None:
        """Answer an event of an epoch (see :class:`yadtqd.server.ingest.Answer`), on the
        ``dispatch`` partition it reads (``partition`` if the server knows no other)."""
        self._send(worker, self.route(worker, partition), m.encode(message))

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
        """Serve the markers' delivery reports; learn partitions added to ``events`` when a
        marker could not be queued (at most once a second)."""
        self.express.poll(0)
        mono = time.monotonic()
        if self._stale_metadata and mono - self._last_refresh >= 1.0:
            self._last_refresh = mono
            self._stale_metadata = False
            with contextlib.suppress(KafkaException):
                self.express.list_topics(self.events_topic, timeout=1.0)

    def flush(self, timeout: float) -> None:
        """Deliver the markers accepted (at shutdown)."""
        transport.flush(self.express, timeout)

    def discard(self) -> None:
        """Drop the markers still held (a term that ends): nothing left in flight."""
        with contextlib.suppress(KafkaException):
            self.express.purge()
            self.express.flush(0)

    def _send(self, worker: str, partition: int, value: bytes) -> None:
        self.out.send(self.topic, value, worker, partition)
