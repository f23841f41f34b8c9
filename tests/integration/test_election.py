"""The servers' group on the real broker: a group consumer that will not connect again is
replaced, and the server leads again through the new one."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from yadtqd import config as configuration
from yadtqd import topics, transport
from yadtqd.server.election import Elector

pytestmark = pytest.mark.kafka


class _Orphaned(transport.ConnectionMonitor):
    """What the monitor says of a client whose brokers librdkafka all dropped (a metadata
    response from a lone broker shutting down lists none)."""

    def __init__(self) -> None:
        super().__init__("server election consumer")
        self.orphaned = True


class _Unconnected(transport.ConnectionMonitor):
    """What the monitor says of a consumer that lost its broker connection a minute ago and never
    connected again (after a frozen broker woke up, while the process's other clients did)."""

    def __init__(self) -> None:
        super().__init__("server election consumer")
        self.state, self.changed_at = "down", time.monotonic() - 60


@pytest.fixture
def elector(bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Elector]:
    """An Elector of its own group, elected; closed at the end."""
    monkeypatch.setattr(transport, "STUCK_AFTER", 1.0)
    config = configuration.load(None, env={"YADTQ_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                                           "YADTQ_TOPIC_PREFIX": f"el{uuid.uuid4().hex[:10]}"})
    topics.ensure_topics(transport.make_admin(config), topics.topic_specs(config))
    el = Elector(config)
    el.said = []  # type: ignore[attr-defined]  # every change's why, in order
    el.on_change = lambda: el.said.append(el.why)  # type: ignore[attr-defined]
    el.start()
    try:
        assert el.leading.wait(60), "never elected"
        assert el.changed.wait(5)  # set right after leading: the election's news is all told
        yield el
    finally:
        el.close()
    assert not el.leading.is_set()


def _replaced(el: Elector, verdict: transport.ConnectionMonitor, why: str) -> None:
    """Give the Elector's live consumer ``verdict``: it must step aside, saying ``why``, and be
    elected again through a new consumer."""
    first = el.consumer
    el.changed.clear()
    el.monitor = verdict  # the broker's timing cannot be had on demand: the verdict is given
    assert el.changed.wait(30), "the stuck consumer's role was kept"
    assert el.leading.wait(60), "not elected again through the new consumer"
    assert el.consumer is not first
    assert [w for w in el.said[-2:] if why in w], el.said  # type: ignore[attr-defined]


def test_a_group_consumer_that_knows_no_broker_is_replaced(elector: Elector) -> None:
    _replaced(elector, _Orphaned(), "knew no broker")


def test_a_group_consumer_unconnected_while_the_reports_producer_is_is_replaced(elector: Elector) -> None:
    deadline = time.monotonic() + 30
    while not elector.reporter_monitor.up or time.monotonic() - elector.reporter_monitor.changed_at < 1.0:
        assert time.monotonic() < deadline, "the reports producer never connected"
        time.sleep(0.1)
    _replaced(elector, _Unconnected(), "stayed unconnected")


def test_a_group_consumer_unconnected_alone_is_kept(elector: Elector) -> None:
    """Without the reports producer connected, an unconnected consumer is the broker away, not a
    stuck client: it is kept."""
    elector.reporter_monitor = _Unconnected()
    elector.changed.clear()
    elector.monitor = _Unconnected()
    assert not elector.changed.wait(3), elector.why
    assert elector.leading.is_set()
