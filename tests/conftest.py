"""Test fixtures: one real Apache Kafka broker for the session, and real YADTQ clusters.

The broker is fetched from Maven Central into the cache and started on free ports by
:mod:`yadtqd.testing.broker`; ``YADTQ_TEST_BOOTSTRAP`` names an existing broker instead. It is
never skipped: a test that needs Kafka fails when the broker cannot be had. When tests fail, the
tail of the broker's log is printed in the summary.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.cluster import Cluster
from tests.netns import Netns
from yadtqd.testing.broker import Broker

_BROKERS: list[Broker] = []

# Property tests judge behaviour, never speed: no per-example deadline (200 ms by default) and no
# health check on how fast examples are generated, both of which a busy two-core machine trips
# (test_arbitrary_json_objects_only_ever_raise_bad_message failed so once in a unit run here).
settings.register_profile("yadtq", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("yadtq")


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``bootstrap.servers`` of the session's broker."""
    existing = os.environ.get("YADTQ_TEST_BOOTSTRAP")
    if existing:
        yield existing
        return
    broker = Broker(tmp_path_factory.mktemp("kafka"))
    _BROKERS.append(broker)
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of the test's own, for tests that stop and start it."""
    broker = Broker(tmp_path / "kafka")
    _BROKERS.append(broker)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def own_cluster(own_broker: Broker, tmp_path: Path) -> Iterator[Cluster]:
    """A YADTQ cluster on the test's own broker (for tests that stop and start the broker)."""
    (tmp_path / "cluster").mkdir()
    c = Cluster(own_broker.bootstrap, tmp_path / "cluster")
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def cluster(bootstrap: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A fresh YADTQ cluster (topics of its own) on the session's broker; nothing started yet."""
    c = Cluster(bootstrap, tmp_path)
    try:
        yield c
    finally:
        c.stop_all()
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            print(c.logs_tail())


@pytest.fixture
def netns(bootstrap: str) -> Iterator[Netns]:
    """A network namespace whose processes reach the session's broker until :meth:`Netns.cut`."""
    ns = Netns()
    ns.create(int(bootstrap.rsplit(":", 1)[1]))
    try:
        yield ns
    finally:
        ns.delete()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int) -> None:
    if exitstatus == 0:
        return
    for broker in _BROKERS:
        terminalreporter.section(f"Kafka broker log ({broker.log_path})")
        terminalreporter.write_line(broker.log_tail(40, min_level="WARN"))
