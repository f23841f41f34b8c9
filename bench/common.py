"""Shared parts of the benchmarks: a broker, a cluster, bulk submission, waiting, statistics."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Producer  # noqa: E402

from tests.cluster import Cluster  # noqa: E402
from yadtqd.client import new_task_id  # noqa: E402
from yadtqd.errors import WaitTimeout  # noqa: E402
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


#: The JVM's JIT compiler threads, by their names as the kernel keeps them (15 characters).
JIT_THREADS = ("C1 CompilerThre", "C2 CompilerThre")
#: A warm-up round ends the warm-up when the broker's JIT used less than this share of its CPU.
SETTLED = 0.05
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(stat: str) -> float:
    """User + system CPU seconds from a ``/proc/.../stat`` line."""
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class MachineBusy:
    """The share of the machine's CPU time (all CPUs, from ``/proc/stat``) not idle between
    construction and :meth:`share`: whether a run had the CPUs full."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    def share(self) -> float:
        """Busy share since construction, 0 to 1."""
        total, idle = self._read()
        return 1 - (idle - self._start[1]) / max(1, total - self._start[0])


def broker_pid(bootstrap: str) -> int | None:
    """The process of the Kafka broker listening at ``bootstrap`` (found by its properties
    file, the last argument of its command line), if it runs on this machine."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if b"kafka.Kafka" not in args:
                continue
            props = Path(args[args.index(b"kafka.Kafka") + 1].decode()).read_text()
        except (OSError, IndexError):
            continue
        if f"//{bootstrap}" in props:
            return int(entry)
    return None


#: The CPU seconds last seen of each JIT compiler thread, by (process, thread) id: the JVM ends
#: idle compiler threads, and what an ended thread used must still count.
_jit_seen: dict[tuple[int, str], float] = {}


def broker_cpu(pid: int) -> tuple[float, float]:
    """(all, JIT compiler threads) CPU seconds the broker process has used so far (all: the
    process's own count, which keeps what ended threads used)."""
    total = cpu_seconds(Path(f"/proc/{pid}/stat").read_text())
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            if name in JIT_THREADS:
                _jit_seen[pid, tid] = cpu_seconds(Path(f"/proc/{pid}/task/{tid}/stat").read_text())
        except OSError:
            continue  # the thread ended meanwhile
    return total, sum(v for (p, _), v in _jit_seen.items() if p == pid)


def warm(bootstrap: str, step: Callable[[], object], most: int = 30) -> tuple[int, list[float]]:
    """Run ``step`` (one round of work through the broker) until the broker's JIT settles: a
    round in which its compiler threads used under :data:`SETTLED` of its CPU (at most
    ``most`` rounds). A fresh broker compiles for a long while: measured here, its compiler
    threads still took 76 µs of every task's 236 after 120,000 tasks, and 6 of 132 once it
    had run twice as many. With 2 workers and rounds of 40,000 tasks, a fresh broker's JIT
    took 27 to 37 % of its CPU in the tenth round in three sittings, and settled in the
    twentieth (from the tenth on, 14 to 66 of its methods deoptimized a round and compiled
    again, all over the broker, not in a part of it YADTQ alone uses). A long-running broker
    has compiled long ago, so figures taken before it settles charge YADTQ with the broker's
    start. Returns the rounds run and each one's JIT share (printed too); without the
    broker's process at hand (another machine, or a bootstrap that names several brokers),
    one round, unmeasured."""
    pid = broker_pid(bootstrap)
    if pid is None:
        step()
        return 1, []
    shares: list[float] = []
    while len(shares) < most and (not shares or shares[-1] >= SETTLED):
        before = broker_cpu(pid)
        step()
        total, jit = (after - first for after, first in zip(broker_cpu(pid), before))
        shares.append(jit / total if total else 0.0)
        print(f"warm-up round {len(shares)}: the broker's JIT used {shares[-1]:.0%} of its CPU",
              file=sys.stderr, flush=True)
    return len(shares), shares


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


def _add(task_id: str, i: int) -> dict[str, object]:
    return {"task-id": task_id, "task": "add", "args": [i, 1]}


def submit_all(bootstrap: str, prefix: str, count: int,
               make_id: Callable[[], str] = new_task_id,
               message: Callable[[str, int], dict[str, object]] = _add) -> tuple[list[str], float]:
    """Produce ``count`` seed-format tasks (``add``, unless ``message`` makes each from its id
    and number) as fast as Kafka takes them, with ids as the client makes them unless
    ``make_id`` is given; returns the ids and the seconds until all were acknowledged."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                         "linger.ms": 5})
    ids = [make_id() for _ in range(count)]
    start = time.perf_counter()
    for i, task_id in enumerate(ids):
        body = json.dumps(message(task_id, i)).encode()
        while True:
            try:
                producer.produce(f"{prefix}.tasks", body, key=task_id.encode())
                break
            except BufferError:
                producer.poll(0.01)
    assert producer.flush(60) == 0
    return ids, time.perf_counter() - start


def wait_done(c: Cluster, count: int, timeout: float = 600.0, last: str | None = None) -> None:
    """Until ``count`` tasks are terminal. With ``last`` (the id submitted last), first until
    that one is, told by the server (``result`` with ``wait``), then counted: granted oldest
    first, it ends among the last, so the 20 ms polls of the count that follow are few (polled
    from the start, they took 5 to 14 % of the server's CPU, charged to YADTQ's figures)."""
    deadline = time.monotonic() + timeout
    if last is not None:
        with contextlib.suppress(WaitTimeout):  # (purged, say): counting still decides
            c.client.result(last, wait=timeout)
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
