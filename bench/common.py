"""Shared parts of the benchmarks: a broker, a cluster, bulk submission, waiting, statistics."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Producer  # noqa: E402

from tests.cluster import Cluster  # noqa: E402
from yadtqd.testing.broker import Broker  # noqa: E402


@contextmanager
def broker() -> Iterator[str]:
    """``YADTQ_TEST_BOOTSTRAP`` if set, else a broker of our own for the run."""
    if os.environ.get("YADTQ_TEST_BOOTSTRAP"):
        yield os.environ["YADTQ_TEST_BOOTSTRAP"]
        return
    with tempfile.TemporaryDirectory() as tmp:
        b = Broker(Path(tmp) / "kafka")
        b.start()
        try:
            yield b.bootstrap
        finally:
            b.stop()


@contextmanager
def cluster(bootstrap: str, workers: int, slots: int = 2, log_level: str = "info",
            prefetch: int = -1, kafka: dict[str, object] | None = None,
            standby: bool = False, server: dict[str, object] | None = None) -> Iterator[Cluster]:
    """A server (and, with ``standby``, a second one standing by) and ``workers`` workers on
    a fresh set of topics."""
    with tempfile.TemporaryDirectory() as tmp:
        c = Cluster(bootstrap, Path(tmp))
        c.write_config(worker={"slots": slots, "heartbeat_interval": 1.0, "prefetch": prefetch},
                       kafka=kafka, server=server)
        c.log_level = log_level
        try:
            c.start_server()
            if standby:
                c.start_standby("server2")
            for i in range(workers):
                c.start_worker(f"bench{i}")
            yield c
        finally:
            c.stop_all()


def submit_all(bootstrap: str, prefix: str, count: int) -> tuple[list[str], float]:
    """Produce ``count`` seed-format ``add`` tasks as fast as Kafka takes them; returns the ids
    and the seconds until all were acknowledged."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                         "linger.ms": 5})
    ids = [str(uuid.uuid4()) for _ in range(count)]
    start = time.perf_counter()
    for i, task_id in enumerate(ids):
        body = json.dumps({"task-id": task_id, "task": "add", "args": [i, 1]}).encode()
        while True:
            try:
                producer.produce(f"{prefix}.tasks", body, key=task_id.encode())
                break
            except BufferError:
                producer.poll(0.01)
    assert producer.flush(60) == 0
    return ids, time.perf_counter() - start


def wait_done(c: Cluster, count: int, timeout: float = 600.0) -> None:
    """Until ``count`` tasks are terminal."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = c.client.stats()["tasks"]
        if tasks.get("success", 0) + tasks.get("failed", 0) >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {tasks} after {timeout} s")
        time.sleep(0.02)


def summary(values: list[float]) -> tuple[float, float, float]:
    """Median, min and max."""
    return statistics.median(values), min(values), max(values)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
