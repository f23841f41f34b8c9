"""The server resumes from the offsets stored in SQLite (invariant 6): nothing re-applied,
nothing lost, while it was down submissions waited in Kafka."""

from __future__ import annotations

import signal

import pytest

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
    assert again == first  # not re-applied: same attempt, same timestamps, same results
    assert cluster.log("server").count("received: add") == received_before + 20
    assert cluster.client.stats()["counters"].get("conflicts", 0) == 0
