"""Every role survives the broker being stopped for a minute and started again: it logs the
outage, recovers on its own, and nothing acknowledged is lost."""

from __future__ import annotations

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
    ledger.check_contract(cluster, book, {t: i for i, t in enumerate(ids)})
    after = cluster.client.submit("add", 1, 2)
    assert cluster.client.result(after, wait=60)["result"] == 3


def _wait_seconds(cluster: Cluster, seconds: float) -> None:
    """Keep the broker down this long while checking that every process stays up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, proc in cluster.processes.items():
            assert proc.poll() is None, f"{name} exited during the outage\n{cluster.logs_tail()}"
        time.sleep(1.0)  # the outage itself is the thing being timed, not a synchronisation
