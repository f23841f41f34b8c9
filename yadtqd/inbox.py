"""A consumer's inbox: a thread reads Kafka and wakes the owner's main loop through a socket
pair, so that loop waits on Kafka and everything else in one call.

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

import socket
import threading
from collections import deque
from collections.abc import Iterable

from confluent_kafka import Consumer, Message, TopicPartition

from yadtqd.transport import read_batch


class Inbox:
    """Messages read from Kafka by a background thread, handed over to the main loop."""

    def __init__(self, consumer: Consumer, limit: int = 500,
                 watch: Iterable[tuple[str, int]] = ()) -> None:
        self.consumer = consumer
        self.limit = limit
        self.watch = [TopicPartition(topic, partition) for topic, partition in watch]
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
        self._thread.start()

    def wake(self) -> None:
        """End the main loop's wait (from any thread)."""
        try:
            self._writer.send(b"w")
        except BlockingIOError:
            pass  # the socket is full of wake-ups already

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

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._room:
                room = self._room.wait_for(
                    lambda: len(self._messages) < self.limit or self._stop.is_set(), 0.2)
            if room and not self._stop.is_set():
                good = read_batch(self.consumer, 0.2, self.limit)
                if good:
                    with self._room:
                        self._messages.extend(good)
                    self.wake()
            for tp in self.watch:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
                self.highs[(tp.topic, tp.partition)] = high
