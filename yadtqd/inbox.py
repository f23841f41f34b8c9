"""A consumer's inbox: a thread reads Kafka and wakes the owner's main loop through a socket
pair, so that loop waits on Kafka and everything else in one call.

The thread also follows the partition counts of the topics it reads (``follow``): when a
topic grows, it starts reading the new partitions from their beginning, and notes the new
count in :attr:`Inbox.counts` for the owner.

The same wake-up socket receives signals (``signal.set_wakeup_fd``), so SIGTERM and SIGHUP end
the main loop's wait at once, and :meth:`Inbox.wake` lets another thread end it too (the server's
socket threads, when they record a task). The thread stops reading while ``limit`` messages wait
untaken, so a backlog stays in Kafka rather than in memory.

Only the inbox's thread calls the consumer once it runs: confluent-kafka serializes calls on one
consumer, and a call from another thread would wait for the thread's next poll to end, and
the next, and so on. So the thread also notes the high watermarks of the partitions in
``watch`` (as librdkafka last fetched them) for the owner to read in :attr:`Inbox.highs`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from yadtqd.transport import read_batch

log = logging.getLogger("yadtqd.kafka")

#: Seconds between two looks at the partition counts of the followed topics.
FOLLOW_EVERY = 5.0


class Inbox:
    """Messages read from Kafka by a background thread, handed over to the main loop."""

    def __init__(self, consumer: Consumer, limit: int = 500,
                 watch: Iterable[tuple[str, int]] = (), follow: dict[str, int] | None = None,
                 watch_topic: str = "") -> None:
        self.consumer = consumer
        self.limit = limit
        self.watch = [TopicPartition(topic, partition) for topic, partition in watch]
        #: topic → partition count, for the topics read whose growth the thread follows.
        self.counts: dict[str, int] = dict(follow or {})
        #: New partitions of this topic are also added to ``watch``.
        self.watch_topic = watch_topic
        self._last_follow = time.monotonic()
        self._started = False
        #: (topic, partition) → high watermark, noted after every read (-1 while unknown).
        self.highs: dict[tuple[str, int], int] = {}
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)
        self._messages: deque[Message] = deque()
        self._room = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="yadtq-inbox", daemon=True)

    @property
    def wakeup_fd(self) -> int:
        """The descriptor to hand to ``signal.set_wakeup_fd``."""
        return self._writer.fileno()

    def start(self) -> None:
        """Start reading."""
        self._started = True
        self._thread.start()

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

    def stop(self) -> None:
        """Stop reading and wait for the thread."""
        self._stop.set()
        with self._room:
            self._room.notify()
        self._thread.join(5)

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
            if room and not self._stop.is_set():
                try:
                    good = read_batch(self.consumer, 0.2, self.limit)
                except KafkaException as exc:  # the consumer reports and goes on; so do we
                    log.warning("reading from Kafka: %s", exc.args[0].str())
                    good = []
                if good:
                    with self._room:
                        self._messages.extend(good)
                    self.wake()
            for tp in self.watch:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
                self.highs[(tp.topic, tp.partition)] = high
            if self.counts and time.monotonic() - self._last_follow >= FOLLOW_EVERY:
                self._last_follow = time.monotonic()
                self._follow()

    def _follow(self) -> None:
        """Start reading the partitions added to a followed topic since the last look."""
        for topic, known in list(self.counts.items()):
            try:
                meta = self.consumer.list_topics(topic, timeout=1.0).topics.get(topic)
            except KafkaException:
                continue  # the broker is away; look again later
            if meta is None or meta.error is not None or len(meta.partitions) <= known:
                continue
            added = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(known, len(meta.partitions))]
            self.consumer.incremental_assign(added)
            if topic == self.watch_topic:
                self.watch += [TopicPartition(topic, tp.partition) for tp in added]
            self.counts[topic] = len(meta.partitions)
            log.warning("topic %s grew from %d to %d partitions: reading the new ones", topic,
                        known, len(meta.partitions), extra={"event": "partitions_added"})
