"""Where a worker reads and writes: its ``events`` partition, and the ``dispatch`` partition its
epochs read (DESIGN 5).

A worker starts on the ``dispatch`` partition of its id's hash and reads it from its end, taken
*before* the first ``hello``; it takes every other partition's end too, so that the server may
place that first epoch on any (``placed``), where fewer workers read, and nothing sent there for
the epoch is missed. A later epoch stays where the worker reads.
"""

from __future__ import annotations

import logging

from confluent_kafka import Consumer

from yadtqd import transport
from yadtqd.config import Config
from yadtqd.errors import UnreachableError
from yadtqd.inbox import Inbox

log = logging.getLogger("yadtqd.worker")


class Placement:
    """The worker's partitions, and the ends of the ``dispatch`` partitions it may be placed on."""

    def __init__(self, config: Config, worker_id: str) -> None:
        self.config = config
        self.worker_id = worker_id
        self.topic = config.topic("dispatch")
        self.events_partition = 0
        self.dispatch_partition = 0
        #: The end of each ``dispatch`` partition before the first ``hello`` (empty after it:
        #: a later epoch is not placed).
        self.ends: dict[int, int] = {}

    @property
    def placeable(self) -> int:
        """How many partitions the server may place the next ``hello``'s epoch on (0: none)."""
        return len(self.ends)

    def assign(self, consumer: Consumer, inbox: Inbox) -> None:
        """Find the worker's partitions and have ``inbox`` read its ``dispatch`` partition from
        the end (before the first ``hello``)."""
        count = transport.partition_count(consumer, self.config.topic("events"))
        self.events_partition = transport.partition_for(self.worker_id, count)
        count = transport.partition_count(consumer, self.topic)
        partition = self.dispatch_partition = transport.partition_for(self.worker_id, count)
        start = transport.end_offset(consumer, self.topic, partition)
        inbox.move({(self.topic, partition): start})
        log.info("reading %s[%d] from offset %d", self.topic, partition, start)
        try:
            self.ends = {p: start if p == partition else
                         transport.end_offset(consumer, self.topic, p, timeout=5.0)
                         for p in range(count)}
        except UnreachableError as exc:  # a partition without a leader, say: stay on this one
            log.warning("this worker stays on %s[%d], which others may read too: %s", self.topic,
                        partition, exc, extra={"worker_id": self.worker_id, "event": "not_placeable"})

    def new_epoch(self) -> None:
        """A later epoch stays where the worker reads now: the ends taken are old."""
        self.ends = {}

    def can_move(self, partition: int) -> bool:
        """Whether the worker took ``partition``'s end before the first ``hello`` (else what
        was sent there for the epoch may be missed)."""
        return partition in self.ends

    def move(self, partition: int, inbox: Inbox, epoch: str) -> transport.ConnectionMonitor:
        """Read ``partition`` from its end before the ``hello`` instead (see :meth:`can_move`),
        with a new consumer (one re-assigned never connected again after a frozen broker);
        returns the new consumer's monitor."""
        consumer, monitor = transport.make_consumer(self.config, "worker")
        inbox.move({(self.topic, partition): self.ends[partition]}, consumer)
        log.info("reading %s[%d] from offset %d instead of [%d]: the server placed epoch %s there",
                 self.topic, partition, self.ends[partition], self.dispatch_partition, epoch,
                 extra={"worker_id": self.worker_id, "event": "worker_placed"})
        self.dispatch_partition = partition
        return monitor
