"""A consumer's inbox: a thread reads Kafka and wakes the owner's main loop through a socket
pair, so that loop waits on Kafka and everything else in one call.

The thread also follows the partition counts of the topics it reads (``follow``): when a
topic grows, it starts reading the new partitions from their beginning, and notes the new
count in :attr:`Inbox.counts` for the owner. The counts are asked of the broker by a second
thread, through a client of their own (``metadata``): a request on the consumer's connection
waits in the broker behind the fetch parked there, up to ``fetch.wait.max.ms``, and the reading
thread that waited with it read nothing meanwhile (issue 15: every 5 s, 116 ms in which a task's
``finished`` sat in librdkafka, the slowest task after an idle spell).

The same wake-up socket receives signals (``signal.set_wakeup_fd``), so SIGTERM and SIGHUP end
the main loop's wait at once, and :meth:`Inbox.wake` lets another thread end it too (the server's
socket threads, when they record a task). The thread stops reading while ``limit`` messages wait
untaken, so a backlog stays in Kafka rather than in memory.

The thread also makes the owner's changes to what is read (:meth:`Inbox.move`), and can read on
with a new consumer from where the old one stopped (:meth:`Inbox.replace`): librdkafka may leave a
consumer that never connects again (see :meth:`~yadtqd.transport.ConnectionMonitor.stuck_beside`).

Only the inbox's thread calls the consumer once it runs: confluent-kafka serializes calls on one
consumer, and a call from another thread would wait for the thread's next poll to end, and
the next, and so on. So the thread also notes the high watermarks of the partitions in
``watch`` (as librdkafka last fetched them) for the owner to read in :attr:`Inbox.highs`.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import deque
from collections.abc import Iterable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from yadtqd.transport import assign, close_later, read_batch

log = logging.getLogger("yadtqd.kafka")

#: Seconds between two looks at the partition counts of the followed topics.
FOLLOW_EVERY = 5.0


class Inbox:
    """Messages read from Kafka by a background thread, handed over to the main loop."""

    def __init__(self, consumer: Consumer, limit: int = 500,
                 watch: Iterable[tuple[str, int]] = (), follow: dict[str, int] | None = None,
                 watch_topic: str = "", metadata: AdminClient | None = None) -> None:
        if follow and metadata is None:
            raise ValueError("an inbox that follows partition counts needs a metadata client")
        self.consumer = consumer
        self.metadata = metadata
        self.limit = limit
        self.watch = [TopicPartition(topic, partition) for topic, partition in watch]
        #: topic → partition count, for the topics read whose growth the thread follows.
        self.counts: dict[str, int] = dict(follow or {})
        #: New partitions of this topic are also added to ``watch``.
        self.watch_topic = watch_topic
        #: topic → a larger partition count the follower saw, for the reading thread to take up.
        self._grown: dict[str, int] = {}
        self._started = False
        #: (topic, partition) → high watermark, noted after every read (-1 while unknown).
        self.highs: dict[tuple[str, int], int] = {}
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)
        self._messages: deque[Message] = deque()
        #: Changes for the thread to make before its next read: a new assignment (None: the
        #: positions reached), and a new consumer to make it on (None: the same one).
        self._moves: list[tuple[dict[tuple[str, int], int] | None, Consumer | None]] = []
        #: (topic, partition) → the next offset to read, for the partitions assigned through
        #: :meth:`move` (or added by ``follow``), as far as the thread has read them.
        self.positions: dict[tuple[str, int], int] = {}
        self._room = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="yadtq-inbox", daemon=True)
        self._follower = threading.Thread(target=self._follow, name="yadtq-inbox-follow", daemon=True)

    @property
    def wakeup_fd(self) -> int:
        """The descriptor to hand to ``signal.set_wakeup_fd``."""
        return self._writer.fileno()

    def start(self) -> None:
        """Start reading."""
        self._started = True
        self._thread.start()
        if self.counts:
            self._follower.start()

    def wake(self) -> None:
        """End the main loop's wait (from any thread)."""
        try:
            self._writer.send(b"w")
        except BlockingIOError:
            pass  # the socket is full of wake-ups already
        except OSError:
            pass  # stopped and closed: nobody waits any more

    def take(self) -> list[Message]:
        """Every message read since the last call, and clear the wake-up socket."""
        try:
            while self.reader.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._room:
            taken = list(self._messages)
            self._messages.clear()
            self._room.notify()
        return taken

    def move(self, positions: dict[tuple[str, int], int], consumer: Consumer | None = None) -> None:
        """Read these partitions from these offsets instead of what is read now, with
        ``consumer`` if given (the old one is then closed); the thread makes the change before
        its next read (within its poll's 0.2 s). Messages already read from the old ones may
        still be taken."""
        with self._room:
            self._moves.append((dict(positions), consumer))
            self._room.notify()

    def replace(self, consumer: Consumer) -> None:
        """Read on with ``consumer`` from the :attr:`positions` the old one reached (it is
        closed in a thread of its own: a stuck client's close may wait long). Nothing read is
        read twice, nothing is skipped. Only for an inbox whose every partition was assigned
        through :meth:`move` (the worker's): the others' are not in :attr:`positions`."""
        with self._room:
            self._moves.append((None, consumer))
            self._room.notify()

    def stop(self, wait: bool = True) -> bool:
        """Stop reading and wait for the thread (5 s at most); True if it ended, and then the
        owner may close :attr:`consumer` (a consumer handed to :meth:`move` or :meth:`replace`
        and not taken up yet is closed here). Without ``wait``, only tell the thread to stop
        (several inboxes then stop together) and return False."""
        self._stop.set()
        with self._room:
            self._room.notify()
        if not wait:
            return False
        self._thread.join(5)
        if self._thread.is_alive():
            return False
        for _, consumer in self._moves:
            if consumer is not None:
                consumer.close()
        self._moves = []
        return True

    def close(self) -> None:
        """Close the wake-up socket (after :meth:`stop`, once no signal is sent to it)."""
        self.reader.close()
        self._writer.close()

    @property
    def alive(self) -> bool:
        """False once the reading thread died of an unexpected error (the owner must stop:
        nothing would be read any more)."""
        return self._thread.is_alive() or self._stop.is_set() or not self._started

    def _run(self) -> None:
        try:
            self._read_until_stopped()
        except Exception:
            log.critical("the Kafka reading thread failed", exc_info=True,
                         extra={"event": "inbox_failed"})
            self.wake()

    def _read_until_stopped(self) -> None:
        while not self._stop.is_set():
            with self._room:
                room = self._room.wait_for(
                    lambda: len(self._messages) < self.limit or self._stop.is_set(), 0.2)
                moves, self._moves = self._moves, []
                grown, self._grown = self._grown, {}
            for positions, consumer in moves:
                self._make(positions, consumer)
            for name, count in grown.items():
                self._grow(name, count)
            if room and not self._stop.is_set():
                try:
                    good = read_batch(self.consumer, 0.2, self.limit)
                except KafkaException as exc:  # the consumer reports and goes on; so do we
                    log.warning("reading from Kafka: %s", exc.args[0].str())
                    good = []
                for msg in good:
                    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                    if topic is not None and partition is not None and offset is not None:
                        self.positions[(topic, partition)] = offset + 1
                if good:
                    with self._room:
                        self._messages.extend(good)
                    self.wake()
            for tp in self.watch:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
                self.highs[(tp.topic, tp.partition)] = high

    def _make(self, positions: dict[tuple[str, int], int] | None, consumer: Consumer | None) -> None:
        """One change of :meth:`move` or :meth:`replace`, in the thread."""
        if positions is None and not self.positions:  # nothing known to read on from
            log.error("a new consumer was not taken: no partition was assigned through the inbox")
            if consumer is not None:
                consumer.close()
            return
        if consumer is not None:
            close_later([self.consumer], "yadtq-inbox-close")
            self.consumer = consumer
        self.positions = dict(self.positions if positions is None else positions)
        assign(self.consumer, self.positions)

    def _follow(self) -> None:
        """The follower's thread: every :data:`FOLLOW_EVERY` seconds, the partition counts of
        the followed topics, asked through :attr:`metadata`; a larger one is handed to the
        reading thread, which starts reading the new partitions."""
        assert self.metadata is not None
        while not self._stop.wait(FOLLOW_EVERY):
            for topic, known in list(self.counts.items()):
                try:
                    meta = self.metadata.list_topics(topic, timeout=1.0).topics.get(topic)
                except KafkaException:
                    continue  # the broker is away; look again later
                if meta is None or meta.error is not None or len(meta.partitions) <= known:
                    continue
                with self._room:
                    self._grown[topic] = max(len(meta.partitions), self._grown.get(topic, 0))
                    self._room.notify()

    def _grow(self, topic: str, count: int) -> None:
        """Start reading the partitions of ``topic`` past those read so far, up to ``count``."""
        known = self.counts[topic]
        if count <= known:
            return  # (seen twice before the reading thread took it up)
        added = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(known, count)]
        self.consumer.incremental_assign(added)
        self.positions.update({(topic, tp.partition): OFFSET_BEGINNING for tp in added})
        if topic == self.watch_topic:
            self.watch += [TopicPartition(topic, tp.partition) for tp in added]
        self.counts[topic] = count
        log.warning("topic %s grew from %d to %d partitions: reading the new ones", topic,
                    known, count, extra={"event": "partitions_added"})
