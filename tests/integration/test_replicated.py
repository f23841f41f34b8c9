"""On a cluster of three brokers (a KRaft controller and three brokers on loopback): topics come
out safe by default, thin ones are named in a warning, and a broker killed during a run loses
nothing and declares no live worker dead (issue 16; issue 11, defect 6)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from tests import ledger
from tests.cluster import Cluster
from yadtqd.testing.broker import BrokerCluster

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def three_brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerCluster]:
    brokers = BrokerCluster(tmp_path_factory.mktemp("brokers"), size=3)
    try:
        brokers.start()
        yield brokers
    finally:
        brokers.stop()


@pytest.fixture
def replicated(three_brokers: BrokerCluster, tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(three_brokers.bootstrap, tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop_all()


def _topic_settings(bootstrap: str, topic: str) -> tuple[int, int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    meta = admin.list_topics(topic, timeout=30).topics[topic]
    replicas = min(len(p.replicas) for p in meta.partitions.values())
    (future,) = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)]).values()
    return replicas, int(future.result(30)["min.insync.replicas"].value)


def test_topics_are_created_with_three_replicas_and_min_insync_2(replicated: Cluster) -> None:
    replicated.start_server()
    for name in ("tasks", "dispatch", "events", "changelog"):
        assert _topic_settings(replicated.bootstrap, f"{replicated.prefix}.{name}") == (3, 2), name
    stats = replicated.client.stats()
    assert stats["warnings"] == []
    assert {t["replicas"] for t in stats["topics"]} == {3}


def test_a_thin_topic_is_named_in_a_warning(replicated: Cluster) -> None:
    admin = AdminClient({"bootstrap.servers": replicated.bootstrap})
    thin = f"{replicated.prefix}.tasks"
    for future in admin.create_topics([NewTopic(thin, 3, 1)]).values():
        future.result(30)
    replicated.start_server()
    (warning,) = replicated.client.stats()["warnings"]
    assert f"topic {thin} has 1 replica(s) on a cluster of 3 brokers" in warning
    assert f"topic {thin} has 1 replica(s)" in replicated.log("server")
    shown = replicated.ctl("stats")
    assert shown.returncode == 0 and f"warning: topic {thin} has 1 replica(s)" in shown.stderr


def test_a_broker_killed_during_a_run_loses_nothing_and_kills_no_worker(
        replicated: Cluster, three_brokers: BrokerCluster, tmp_path: Path) -> None:
    replicated.write_config(server={"heartbeat_timeout": 3.0}, worker={"heartbeat_interval": 0.5})
    replicated.start_server()
    replicated.start_worker("w1")
    replicated.start_worker("w2")
    book = tmp_path / "ledger"
    expected = {replicated.client.submit("ledger", str(book), 0.1, i): i for i in range(300)}
    replicated.wait_for(lambda: replicated.client.stats()["tasks"].get("success", 0) >= 30,
                        "a running start")
    victim = three_brokers.brokers[0]
    assert victim.process is not None
    victim.process.send_signal(signal.SIGKILL)  # no controlled shutdown: leaders move after ~9 s
    victim.process.wait()
    try:
        replicated.wait_terminal(list(expected), timeout=300)
        assert replicated.client.failures() == []
        verdict = ledger.check_contract(replicated, book, expected)
        assert verdict.re_executions == 0
    finally:
        victim.process = None
        victim.start()
