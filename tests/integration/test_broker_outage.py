"""Every role survives the broker being stopped for a minute and started again: it logs the
outage, recovers on its own, and nothing acknowledged is lost."""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from pathlib import Path

import pytest

from tests import ledger
from tests.cluster import Cluster
from yadtqd.testing.broker import Broker

pytestmark = pytest.mark.kafka

OUTAGE = 60.0


def test_a_minute_without_the_broker(own_cluster: Cluster, own_broker: Broker, tmp_path: Path) -> None:
    cluster = own_cluster
    cluster.start_server()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    book = tmp_path / "ledger"
    ids = [cluster.client.submit("ledger", str(book), 0.5, i) for i in range(30)]
    cluster.wait_for(lambda: sum(v["status"] == "success" for v in cluster.client.status(*ids).values()) >= 3,
                     "a few tasks to finish")
    own_broker.stop()
    cluster.wait_for(lambda: all("broker connection lost" in cluster.log(n) for n in ("server", "w1", "w2")),
                     "every role to log the outage", timeout=OUTAGE)
    before = cluster.client.stats()["tasks"]  # the server still answers queries
    assert sum(before.values()) == 30
    assert cluster.client.status(ids[0])[ids[0]]["status"] != "unknown"  # reads need no Kafka
    _wait_seconds(cluster, OUTAGE)
    own_broker.start()
    statuses = cluster.wait_terminal(ids, timeout=180)
    assert all(v["status"] == "success" for v in statuses.values())
    for name in ("server", "w1", "w2"):
        assert "broker connection back" in cluster.log(name), name
    assert cluster.processes["server"].poll() is None
    verdict = ledger.check_contract(cluster, book, {t: i for i, t in enumerate(ids)})
    assert verdict.re_executions == 0 and cluster.client.failures() == []
    after = cluster.client.submit("add", 1, 2)
    assert cluster.client.result(after, wait=60)["result"] == 3


def _wait_seconds(cluster: Cluster, seconds: float) -> None:
    """Keep the broker down this long while checking that every process stays up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, proc in cluster.processes.items():
            assert proc.poll() is None, f"{name} exited during the outage\n{cluster.logs_tail()}"
        time.sleep(1.0)  # the outage itself is the thing being timed, not a synchronisation


def _running(cluster: Cluster, book: Path, count: int) -> list[str]:
    """A server and two workers whose librdkafka gives up on a message after 5 s (every outage
    below outlasts that), ``count`` one-second ledger tasks, a few of them done and both workers
    mid-task."""
    cluster.write_config(kafka={"message.timeout.ms": 5000},
                         worker={"heartbeat_interval": 0.5, "slots": 2})
    cluster.start_server()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    ids = [cluster.client.submit("ledger", str(book), 1.0, i) for i in range(count)]
    cluster.wait_for(lambda: _both_mid_task(cluster, ids), "a few tasks to finish, and both"
                     " workers each to run one that ends more than 0.3 s from now")
    return ids


def _both_mid_task(cluster: Cluster, ids: list[str]) -> bool:
    """Whether a few tasks succeeded and each worker runs a task started under 0.7 s ago: one
    that ends after the broker is stopped now, so each has an event that outlives the outage
    (a worker between two tasks when the broker stops may have none in flight)."""
    views = cluster.client.status(*ids).values()
    now = time.time()
    fresh = {v["worker"] for v in views if v["status"] == "processing" and v.get("started_at")
             and now - dt.datetime.fromisoformat(v["started_at"]).timestamp() < 0.7}
    return sum(v["status"] == "success" for v in views) >= 6 and fresh >= {"w1", "w2"}


def test_an_outage_longer_than_the_message_timeout_loses_nothing(
        own_cluster: Cluster, own_broker: Broker, tmp_path: Path) -> None:
    """Every event and grant that librdkafka gave up on during the outage is sent again: tasks
    queued, granted, running and finished during it all end (issue 11, defect 1)."""
    cluster = own_cluster
    book = tmp_path / "ledger"
    ids = _running(cluster, book, 40)
    own_broker.stop()
    cluster.wait_for(lambda: all("not delivered to Kafka" in cluster.log(n) for n in ("w1", "w2")),
                     "the workers' events to fail delivery", timeout=60)
    _wait_seconds(cluster, 15)
    own_broker.start()
    statuses = cluster.wait_terminal(ids, timeout=180)
    assert all(v["status"] == "success" for v in statuses.values())
    verdict = ledger.check_contract(cluster, book, {t: i for i, t in enumerate(ids)})
    assert verdict.re_executions == 0 and cluster.client.failures() == []
    counters = cluster.client.stats()["counters"]
    assert counters.get("undelivered", 0) + sum(w["undelivered"] for w in cluster.client.workers()) > 0


def test_a_frozen_broker_declares_no_worker_dead(own_cluster: Cluster, own_broker: Broker,
                                                 tmp_path: Path) -> None:
    """A broker frozen (SIGSTOP) for 25 s is not a live link with silent workers: nobody is
    declared dead, and every task ends once it wakes (issue 11, defects 1 and 6)."""
    cluster = own_cluster
    book = tmp_path / "ledger"
    ids = _running(cluster, book, 60)
    assert own_broker.process is not None
    os.kill(own_broker.process.pid, signal.SIGSTOP)
    try:
        _wait_seconds(cluster, 25)
    finally:
        os.kill(own_broker.process.pid, signal.SIGCONT)
    statuses = cluster.wait_terminal(ids, timeout=180)
    assert all(v["status"] == "success" for v in statuses.values())
    assert cluster.client.failures() == []
    verdict = ledger.check_contract(cluster, book, {t: i for i, t in enumerate(ids)})
    assert verdict.re_executions == 0
