"""The worker's dispatch inbox: a thread reads the worker's ``dispatch`` partition and wakes the
main loop through a socket pair, so the main loop waits on Kafka and the pool in one call.

The same wake-up socket receives signals (``signal.set_wakeup_fd``), so SIGTERM and SIGHUP end
the main loop's wait at once.
"""

from __future__ import annotations

import socket
import threading
from collections import deque

from confluent_kafka import Consumer, Message

from yadtqd.transport import read_batch

class Inbox:
    """Messages read from Kafka by a background thread, handed over to the main loop."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)
        self._messages: deque[Message] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="yadtq-inbox", daemon=True)

    @property
    def wakeup_fd(self) -> int:
        """The descriptor to hand to ``signal.set_wakeup_fd``."""
        return self._writer.fileno()

    def start(self) -> None:
        """Start reading."""
        self._thread.start()

    def take(self) -> list[Message]:
        """Every message read since the last call, and clear the wake-up socket."""
        try:
            while self.reader.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            taken = list(self._messages)
            self._messages.clear()
        return taken

    def stop(self) -> None:
        """Stop reading and wait for the thread."""
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            good = read_batch(self.consumer, 0.2, 500)
            if not good:
                continue
            with self._lock:
                self._messages.extend(good)
            try:
                self._writer.send(b"m")
            except BlockingIOError:
                pass  # the socket is full of wake-ups already
