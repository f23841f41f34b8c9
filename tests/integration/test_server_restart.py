"""The server resumes from the offsets stored in SQLite (invariant 6): nothing re-applied,
nothing lost, while it was down submissions waited in Kafka."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from tests import ledger
from tests.cluster import Cluster
from yadtqd.client import KafkaSubmitter

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_restart_resumes_from_stored_offsets(cluster: Cluster, sig: int) -> None:
    cluster.start_server()
    cluster.start_worker("w1")
    before = [cluster.client.submit("add", i, 1) for i in range(20)]
    first = cluster.wait_terminal(before)
    cluster.stop("server", sig)
    with KafkaSubmitter({"bootstrap.servers": cluster.bootstrap}, cluster.prefix) as kafka:
        during = [kafka.submit("add", i, 100) for i in range(20)]
    received_before = cluster.log("server").count("received: add")
    cluster.start_server()
    after = cluster.wait_terminal(during)
    assert [after[t]["result"] for t in during] == [i + 100 for i in range(20)]
    again = cluster.status(before)
    # not re-applied, or re-applied to the same rows: a SIGKILL may land after SQLite's commit
    # and before the changelog's, and then the last outcomes are read again from `events`
    assert again == first
    assert cluster.log("server").count("received: add") == received_before + 20
    counters = cluster.client.stats()["counters"]
    assert counters.get("conflicts", 0) == 0
    assert counters.get("duplicates", 0) == 0  # no submission read twice
    assert counters.get("stale_events", 0) == 0  # no event read twice


def test_task_lengths_are_the_workers_measure_not_the_replays(cluster: Cluster, tmp_path: Path) -> None:
    """After a restart the server applies a backlog of started and finished events in one go.
    Judged by when it applied them, 1.5 s tasks would look instant, and the adaptive prefetch
    would pile them onto each worker; judged by the workers' own measure, none wait in a
    worker (issue 11, defect 10)."""
    cluster.write_config(worker={"slots": 1})
    cluster.start_server()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    book = tmp_path / "ledger"
    warm_up = str(tmp_path / "warm-up")  # the server learns that ledger tasks are short
    cluster.wait_terminal([cluster.client.submit("ledger", warm_up, 0.01, i) for i in range(10)])
    long = [cluster.client.submit("ledger", str(book), 1.5, i) for i in range(8)]
    cluster.wait_for(lambda: sum(v["status"] == "processing" for v in cluster.status(long).values()) == 2,
                     "both workers to run a long task")
    cluster.stop("server", signal.SIGKILL)
    with sqlite3.connect(cluster.database) as db:  # what the workers hold: they run it all now
        held = [r[0] for r in db.execute("SELECT id FROM tasks WHERE status IN ('assigned', 'processing')")]
    cluster.wait_for(lambda: sum(e.phase == "end" for e in ledger.read(book)) == len(held),
                     "the workers to finish what they hold while the server is down")
    with KafkaSubmitter({"bootstrap.servers": cluster.bootstrap}, cluster.prefix) as kafka:
        later = [kafka.submit("ledger", str(book), 1.5, i) for i in range(8, 16)]
    cluster.start_server()
    cluster.wait_terminal(held)  # the backlog is applied: every grant held from here on is new
    most_held = 0
    while True:
        views = cluster.status(long + later)
        for worker in ("w1", "w2"):
            now_held = sum(v["worker"] == worker and v["status"] == "processing"
                           or v.get("waiting", "").startswith(f"granted to {worker};")
                           for v in views.values())
            most_held = max(most_held, now_held)
        if all(v["status"] in ("success", "failed") for v in views.values()):
            break
        time.sleep(0.1)  # sampling how many grants each worker holds, not waiting for an event
    assert most_held <= 1
    verdict = ledger.check_contract(cluster, book, {t: i for i, t in enumerate(long + later)})
    assert verdict.re_executions == 0


def test_workers_events_are_applied_while_a_backlog_of_submissions_is_recorded(cluster: Cluster) -> None:
    """Issue 15: ``events`` and ``tasks`` are read by consumers of their own, and each turn takes
    the events first, so a backlog of submissions does not hold back the ``finished`` of the
    tasks granted meanwhile. The server comes back to 30,000 submissions waiting in Kafka, a
    name it has not timed yet (its worker may hold 2 grants until one ends): read behind the
    backlog, the first ``finished`` came after it was recorded, and 2 tasks ended before its
    last submission was recorded. Counts, not times."""
    cluster.start_server()
    cluster.start_worker("w1")
    cluster.wait_for(lambda: cluster.live_workers() == {"w1"}, "the worker to join")
    cluster.stop("server")
    producer = Producer({"bootstrap.servers": cluster.bootstrap, "linger.ms": 20})
    for i in range(30_000):
        task_id = str(uuid.uuid4())
        producer.produce(f"{cluster.prefix}.tasks", json.dumps(
            {"task-id": task_id, "task": "add", "args": [i, 1]}).encode(), key=task_id.encode())
        producer.poll(0)
    assert producer.flush(60) == 0
    cluster.start_server()
    cluster.wait_for(lambda: cluster.client.stats()["tasks"].get("success", 0) == 30_000,
                     "the backlog to run", timeout=300)
    with sqlite3.connect(cluster.database) as db:
        recorded, = db.execute("SELECT max(submitted_at) FROM tasks").fetchone()
        ended, = db.execute("SELECT count(*) FROM tasks WHERE finished_at < ?", (recorded,)).fetchone()
    assert ended > 100, f"{ended} tasks ended before the backlog's last submission was recorded"
