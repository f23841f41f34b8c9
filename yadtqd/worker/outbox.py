"""The worker's side of ``events``: everything it tells the server, in order.

Events go through one producer, which batches (``linger.ms``, 1 ms by default), so a busy
worker sends few, full requests. An *urgent* event (the worker is close to idle, or it says
``hello`` or ``bye``) is pushed out at once: librdkafka ignores the linger while it flushes.
Waiting for that acknowledgement (well under a millisecond on a LAN, at most
:data:`URGENT_WAIT`) costs a worker that has nothing else to do nothing, and saves a lone task's
result the batching delay. One producer keeps the events in the order they happened.
"""

from __future__ import annotations

import msgspec

from yadtqd import messages as m
from yadtqd import transport
from yadtqd.config import Config

#: The longest an urgent event holds the worker's loop waiting for Kafka's acknowledgement.
URGENT_WAIT = 0.01


class Outbox:
    """Sends a worker's events to its ``events`` partition, in order."""

    def __init__(self, config: Config, worker_id: str, partition: int) -> None:
        self.topic = config.topic("events")
        self.worker_id = worker_id
        self.partition = partition
        self.producer, _ = transport.make_producer(config, "worker")

    def send(self, message: msgspec.Struct, urgent: bool) -> None:
        """Queue an event; ``urgent`` pushes it (and all before it) out now."""
        transport.send(self.producer, self.topic, m.encode(message), self.worker_id, self.partition)
        if urgent:
            self.producer.flush(URGENT_WAIT)

    def poll(self) -> None:
        """Serve delivery reports and errors."""
        self.producer.poll(0)

    def flush(self, timeout: float) -> None:
        """Deliver what was accepted (at shutdown)."""
        transport.flush(self.producer, timeout)
