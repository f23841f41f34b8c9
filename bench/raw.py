"""The raw-Kafka limit: the same hops as a YADTQ task (client -> tasks -> server -> dispatch ->
worker -> events -> server), done by plain confluent-kafka producers and consumers that do no
work. YADTQ's figures are reported as a ratio of these."""

from __future__ import annotations

import threading
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

PRODUCER = {"acks": "all", "enable.idempotence": True, "linger.ms": 1}
CONSUMER = {"enable.auto.commit": False, "fetch.wait.max.ms": 100}


class Hops:
    """A relay 'server' and a relay 'worker' on fresh topics."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.prefix = f"raw{uuid.uuid4().hex[:8]}"
        admin = AdminClient({"bootstrap.servers": bootstrap})
        topics = [NewTopic(f"{self.prefix}.{t}", 1, 1) for t in ("tasks", "dispatch", "events")]
        for future in admin.create_topics(topics).values():
            future.result()
        self.done = 0
        self.done_at: dict[bytes, float] = {}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._server, daemon=True),
                        threading.Thread(target=self._worker, daemon=True)]
        for t in self.threads:
            t.start()

    def _consumer(self, *topics: str) -> Consumer:
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.prefix, **CONSUMER})
        c.assign([TopicPartition(f"{self.prefix}.{t}", 0, 0) for t in topics])
        return c

    def _server(self) -> None:
        consumer = self._consumer("tasks", "events")
        producer = Producer({"bootstrap.servers": self.bootstrap, **PRODUCER})
        while not self.stop.is_set():
            for msg in _batch(consumer):
                if msg.error():
                    continue
                if msg.topic().endswith(".tasks"):
                    producer.produce(f"{self.prefix}.dispatch", msg.value())
                else:
                    self.done += 1
                    self.done_at[msg.value()] = time.perf_counter()
            producer.poll(0)

    def _worker(self) -> None:
        consumer = self._consumer("dispatch")
        producer = Producer({"bootstrap.servers": self.bootstrap, **PRODUCER})
        while not self.stop.is_set():
            for msg in _batch(consumer):
                if not msg.error():
                    producer.produce(f"{self.prefix}.events", msg.value())
            producer.poll(0)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def _batch(consumer: Consumer) -> list:  # type: ignore[type-arg]
    """What YADTQ's loops do too: wait for one message, then take what else is there."""
    first = consumer.poll(0.05)
    return [first, *consumer.consume(499, 0)] if first is not None else []


def throughput(bootstrap: str, count: int) -> float:
    """Messages per second through all the hops."""
    hops = Hops(bootstrap)
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER})
    start = time.perf_counter()
    for i in range(count):
        while True:
            try:
                producer.produce(f"{hops.prefix}.tasks", str(i).encode())
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(60)
    while hops.done < count:
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    hops.close()
    return count / elapsed


def latencies(bootstrap: str, count: int, idle: float = 0.0) -> list[float]:
    """Seconds per message through all the hops, one message at a time; with ``idle``, each
    sent after that many seconds in which the hops had nothing to do."""
    hops = Hops(bootstrap)
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER})
    out = []
    for i in range(count):
        key = f"m{i}".encode()
        if idle:
            time.sleep(idle)  # the point: hops left idle, not a wait for an event
        start = time.perf_counter()
        producer.produce(f"{hops.prefix}.tasks", key)
        producer.flush(10)
        while key not in hops.done_at:
            time.sleep(0.0002)
        out.append(hops.done_at[key] - start)
    hops.close()
    return out
