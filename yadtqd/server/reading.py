"""What the active server reads: ``events`` and ``tasks``, each through a consumer and an inbox of
its own, from the offsets saved in the store (invariant 6).

Two consumers, so that the workers' events never wait behind a burst of submissions. One
consumer hands its messages over in the order it fetched them: a burst of 100,000 submissions
took the loop 3.3 s to record, and meanwhile the ``finished`` of the tasks it had granted waited
behind the rest of the burst in librdkafka's queue (up to 4 MiB of it), so the workers had
nothing more to run: 1 % of the burst was granted after 1.2 s, 10 % after 4.1 (issue 15). Now
each turn takes every event read, then the submissions read, and the grants go on while a
burst is recorded.
"""

from __future__ import annotations

import logging
import select

from confluent_kafka import Consumer, Message
from confluent_kafka.admin import AdminClient

from yadtqd import transport
from yadtqd.config import Config
from yadtqd.inbox import Inbox
from yadtqd.store import Store
from yadtqd.transport import ConnectionMonitor

log = logging.getLogger("yadtqd.server")


class Reading:
    """The active server's two consumers and their inboxes, events first."""

    def __init__(self, config: Config, store: Store, admin: AdminClient, timeout: float) -> None:
        """Make the consumers and assign them the saved offsets (an offset that fell out of
        retention is logged at error with the count of messages lost); ``timeout`` bounds each
        question to the broker. Raises :class:`~yadtqd.errors.UnreachableError` (nothing is left
        open then)."""
        self.config = config
        self.tasks_topic = config.topic("tasks")
        self.events_topic = config.topic("events")
        #: topic → partition count, for ``tasks``, ``events`` and ``dispatch``, as at the start.
        self.counts: dict[str, int] = {}
        made: list[Consumer] = []
        try:
            events, events_monitor = transport.make_consumer(config, "server")
            made.append(events)
            tasks, tasks_monitor = transport.make_consumer(config, "server-tasks")
            made.append(tasks)
            positions = self._positions(events, store, timeout)
            for consumer, topic in ((events, self.events_topic), (tasks, self.tasks_topic)):
                transport.assign(consumer, {tp: at for tp, at in positions.items() if tp[0] == topic})
        except BaseException:
            for consumer in made:
                consumer.close()
            raise
        self.monitors: tuple[ConnectionMonitor, ...] = (events_monitor, tasks_monitor)
        batch = config.server.batch_size
        #: The workers' events; its socket also takes signals and :meth:`wake`.
        self.events = Inbox(events, batch, follow={self.events_topic: self.counts[self.events_topic]},
                            metadata=admin)
        self.tasks = Inbox(tasks, batch, follow={self.tasks_topic: self.counts[self.tasks_topic]},
                           metadata=admin)
        self._inboxes = (self.events, self.tasks)
        self._ended = [False, False]
        # poll, not select: once the open-files limit is raised (yadtqd/openfiles.py) these may
        # be made past descriptor 1,023, which select() cannot wait on
        self._poll = select.poll()
        for inbox in self._inboxes:
            self._poll.register(inbox.reader, select.POLLIN)

    def wait(self, timeout: float) -> None:
        """Wait until either inbox has messages (or was woken), at most ``timeout`` seconds."""
        self._poll.poll(max(0.0, timeout) * 1000)

    @property
    def wakeup_fd(self) -> int:
        """The descriptor to hand to ``signal.set_wakeup_fd``."""
        return self.events.wakeup_fd

    @property
    def alive(self) -> bool:
        """False once a reading thread died of an unexpected error."""
        return all(inbox.alive for inbox in self._inboxes)

    @property
    def events_partitions(self) -> int:
        """How many partitions of ``events`` are read now (the topic may have grown)."""
        return self.events.counts.get(self.events_topic, 0)

    def start(self) -> None:
        """Start reading."""
        for inbox in self._inboxes:
            inbox.start()

    def wake(self) -> None:
        """End the loop's wait (from any thread)."""
        self.events.wake()

    def take(self) -> list[Message]:
        """Every event read since the last call, then the submissions read. Each inbox reads
        no more while ``batch_size`` messages wait in it, and reads up to that many at once: a
        turn takes fewer than four times ``batch_size``."""
        return self.events.take() + self.tasks.take()

    def stop(self) -> None:
        """Stop reading: both threads at once, then wait for each (5 s at most)."""
        for inbox in self._inboxes:
            inbox.stop(wait=False)
        self._ended = [inbox.stop() for inbox in self._inboxes]

    def close(self) -> None:
        """After :meth:`stop`: close each consumer whose thread ended (else that thread may
        still be using it; a consumer's close may wait for its coordinator, so the owner
        closes them last), and the inboxes' sockets."""
        for inbox, ended in zip(self._inboxes, self._ended):
            if ended:
                inbox.consumer.close()
            inbox.close()

    def _positions(self, consumer: Consumer, store: Store, timeout: float) -> dict[tuple[str, int], int]:
        """Where to read each partition of ``tasks`` and ``events`` from, counting the
        partitions of those and of ``dispatch`` in :attr:`counts`."""
        saved = store.offsets()
        positions: dict[tuple[str, int], int] = {}
        for topic in (self.tasks_topic, self.events_topic, self.config.topic("dispatch")):
            self.counts[topic] = transport.partition_count(consumer, topic, timeout)
        lost = 0
        for topic in (self.tasks_topic, self.events_topic):
            for p in range(self.counts[topic]):
                low = transport.low_offset(consumer, topic, p, timeout)
                position = saved.get((topic, p))
                if position is not None and position < low:
                    lost += low - position
                    log.error("%s[%d]: offsets %d to %d were deleted before this server read"
                              " them (retention): %d messages lost", topic, p, position, low - 1,
                              low - position, extra={"event": "offsets_lost"})
                elif position is None and low > 0:
                    log.warning("%s[%d]: a new database starts at offset %d, the oldest kept",
                                topic, p, low)
                positions[(topic, p)] = max(position or 0, low)
        if lost:
            with store.transaction():
                store.bump("offsets_lost", lost)
        return positions
