"""Server scale: grants per second with many lightweight simulated workers, and the database
size and server memory as tasks accumulate.

    .venv/bin/python bench/scale.py [--workers 100] [--tasks 1000000] [--step 100000]
                                    [--slots 4] [--random-ids]

The simulated workers speak the protocol straight over Kafka (hello, heartbeats, and an
immediate started + finished for every run), so the figure is the server's own limit (with at
most ``workers`` x ``slots`` tasks out at once: a grant's round trip through Kafka bounds it
too when they are few). The task ids are the client's (time-ordered UUIDs), or with
``--random-ids`` UUID4s, as a client that makes its own may send. Tasks are
submitted in steps; after each step the run prints tasks/s, the database size, the server's
resident memory, the server's CPU per task and the share of one core its busiest thread used
(the loop: near 100 % says that thread, not the machine, is the bound).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec  # noqa: E402
from common import broker, cluster, cpu_seconds, submit_all, wait_done  # noqa: E402
from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from yadtqd import messages as m  # noqa: E402
from yadtqd.client import new_task_id  # noqa: E402


class Simulator:
    """``count`` worker epochs in one process that finish every task at once."""

    def __init__(self, bootstrap: str, prefix: str, count: int, slots: int = 4) -> None:
        self.bootstrap, self.prefix, self.slots = bootstrap, prefix, slots
        self.workers = {f"sim{i:03d}": uuid.uuid4().hex for i in range(count)}
        self.producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                                  "enable.idempotence": True, "linger.ms": 2})
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{prefix}.sim",
                                  "enable.auto.commit": False})
        meta = self.consumer.list_topics(f"{prefix}.dispatch", timeout=30)
        self.dispatch_parts = len(meta.topics[f"{prefix}.dispatch"].partitions)
        meta = self.consumer.list_topics(f"{prefix}.events", timeout=30)
        self.event_parts = len(meta.topics[f"{prefix}.events"].partitions)
        ends = [TopicPartition(f"{prefix}.dispatch", p,
                               self.consumer.get_watermark_offsets(
                                   TopicPartition(f"{prefix}.dispatch", p), 30)[1])
                for p in range(self.dispatch_parts)]
        self.consumer.assign(ends)
        self.stop = threading.Event()
        for worker, epoch in self.workers.items():
            self._send(m.Hello(worker=worker, epoch=epoch, ts=time.time(), host="sim", pid=os.getpid(),
                               slots=slots, prefetch=0, tasks={"add": m.TaskInfo(plugin="sim")},
                               version="sim"))
        self.producer.flush(30)
        self.threads = [threading.Thread(target=self._serve, daemon=True),
                        threading.Thread(target=self._beat, daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self, msg: msgspec.Struct) -> None:
        worker = msg.worker  # type: ignore[attr-defined]
        while True:
            try:
                self.producer.produce(f"{self.prefix}.events", m.encode(msg), key=worker.encode(),
                                      partition=zlib.crc32(worker.encode()) % self.event_parts)
                return
            except BufferError:
                self.producer.poll(0.01)

    def _serve(self) -> None:
        while not self.stop.is_set():
            first = self.consumer.poll(0.1)
            if first is None:
                continue
            for msg in [first, *self.consumer.consume(999, 0)]:
                if msg.error():
                    continue
                run = m.parse_dispatch(msg.value())
                if not isinstance(run, m.Run) or self.workers.get(run.worker) != run.epoch:
                    continue
                now = time.time()
                self._send(m.Started(worker=run.worker, epoch=run.epoch, ts=now, task_id=run.task_id,
                                     attempt=run.attempt))
                self._send(m.Finished(worker=run.worker, epoch=run.epoch, ts=now, task_id=run.task_id,
                                      attempt=run.attempt, status="success",
                                      result=msgspec.Raw(b"null")))
            self.producer.poll(0)

    def _beat(self) -> None:
        while not self.stop.wait(1.0):
            for worker, epoch in self.workers.items():
                self._send(m.Heartbeat(worker=worker, epoch=epoch, ts=time.time(), slots=self.slots,
                                       busy=0))

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        self.producer.flush(10)
        self.consumer.close()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU seconds used so far by each thread of ``pid``, by thread id."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[tid] = cpu_seconds(Path(f"/proc/{pid}/task/{tid}/stat").read_text())
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return out


class Step(NamedTuple):
    """One step's figures."""

    tasks: int  # so far
    rate: float  # tasks/s in the step
    db_mib: float  # the database with its WAL
    rss_mib: float  # the server's resident memory
    cpu_us: float  # the server's CPU per task in the step, all threads
    loop_share: float  # the share of one core the server's busiest thread used in the step


def steps(bootstrap: str, workers: int, tasks: int, step: int,
          report: Callable[[Step], None] | None = None, slots: int = 4,
          make_id: Callable[[], str] = new_task_id) -> list[Step]:
    """Submit ``tasks`` in steps to a server with ``workers`` simulated workers of ``slots``
    slots, with ids from ``make_id``; each step's figures."""
    out = []
    with cluster(bootstrap, 0) as c:
        sim = Simulator(bootstrap, c.prefix, workers, slots)
        c.wait_for(lambda: len(c.live_workers()) == workers, "the simulated workers")
        server_pid = c.processes["server"].pid
        done = 0
        while done < tasks:
            size = min(step, tasks - done)
            before = thread_seconds(server_pid)
            start = time.perf_counter()
            ids, _ = submit_all(bootstrap, c.prefix, size, make_id)
            done += size
            wait_done(c, done, timeout=3600, last=ids[-1])
            seconds = time.perf_counter() - start
            used = {tid: cpu - before.get(tid, 0.0) for tid, cpu in thread_seconds(server_pid).items()}
            db = sum(p.stat().st_size for p in Path(c.database).parent.glob("yadtq.db*")) / 2**20
            out.append(Step(done, size / seconds, db, rss_mib(server_pid), sum(used.values()) / size * 1e6,
                            max(used.values()) / seconds))
            if report:
                report(out[-1])
        sim.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--step", type=int, default=100_000)
    parser.add_argument("--slots", type=int, default=4, help="each simulated worker's slots")
    parser.add_argument("--random-ids", action="store_true",
                        help="task ids as UUID4s (a client that makes its own) instead of the client's")
    args = parser.parse_args()
    print(f"{'tasks':>10} {'tasks/s':>9} {'db MiB':>8} {'server RSS MiB':>15} {'server µs/task':>15}"
          f" {'busiest thread':>15}", flush=True)
    with broker() as bootstrap:
        steps(bootstrap, args.workers, args.tasks, args.step,
              lambda s: print(f"{s.tasks:>10,} {s.rate:>9,.0f} {s.db_mib:>8,.1f} {s.rss_mib:>15,.1f}"
                              f" {s.cpu_us:>15,.0f} {s.loop_share:>15.0%}", flush=True), args.slots,
              (lambda: str(uuid.uuid4())) if args.random_ids else new_task_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
