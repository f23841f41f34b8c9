"""The Kafka transport against the real broker: topics, idempotent producers, manual
assignment from a given offset, and the broker connection's loss and return."""

from __future__ import annotations

import json
import logging
import select
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import NewPartitions

from yadtqd import config as configuration
from yadtqd import inbox as inbox_module
from yadtqd import topics, transport
from yadtqd.inbox import Inbox
from yadtqd.testing.broker import Broker

pytestmark = pytest.mark.kafka


def _config(bootstrap: str, **kafka: object) -> configuration.Config:
    env = {"YADTQ_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "YADTQ_TOPIC_PREFIX": f"tr{uuid.uuid4().hex[:10]}",
           "YADTQ_SERVER_PARTITIONS": "2"}
    env.update({f"YADTQ_KAFKA_{k.upper()}": str(v) for k, v in kafka.items()})
    return configuration.load(None, env=env)


def test_topics_are_created_once_with_configured_partitions(bootstrap: str) -> None:
    config = _config(bootstrap)
    admin = transport.make_admin(config)
    created = topics.ensure_topics(admin, topics.topic_specs(config))
    assert sorted(created) == sorted(config.topic(t) for t in ("tasks", "dispatch", "events", "changelog", "leader"))
    assert topics.ensure_topics(admin, topics.topic_specs(config)) == []
    consumer, _ = transport.make_consumer(config, "test")
    assert transport.partition_count(consumer, config.topic("events")) == 2
    consumer.close()


def test_idempotent_producer_and_manual_assignment_from_an_offset(bootstrap: str) -> None:
    config = _config(bootstrap)
    topics.ensure_topics(transport.make_admin(config), topics.topic_specs(config))
    producer, _ = transport.make_producer(config, "test")
    topic = config.topic("tasks")
    for i in range(10):
        producer.produce(topic, f"m{i}".encode(), partition=1)
    assert transport.flush(producer, 30) == 0
    consumer, _ = transport.make_consumer(config, "test")
    assert transport.end_offset(consumer, topic, 1) == 10
    transport.assign(consumer, {(topic, 1): 6})
    got = []
    deadline = time.monotonic() + 30
    while len(got) < 4 and time.monotonic() < deadline:
        msg = consumer.poll(1.0)
        if msg is not None and not msg.error():
            got.append((msg.offset(), msg.value()))
    assert got == [(6, b"m6"), (7, b"m7"), (8, b"m8"), (9, b"m9")]
    assert consumer.assignment() == [TopicPartition(topic, 1)]
    consumer.close()


def test_connection_loss_and_return_are_logged(own_broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="yadtqd.kafka")
    config = _config(own_broker.bootstrap, reconnect_backoff_max_ms=500)
    topics.ensure_topics(transport.make_admin(config), topics.topic_specs(config))
    producer, link = transport.make_producer(config, "test")

    def poll_until(state: str) -> None:
        deadline = time.monotonic() + 60
        while link.state != state:
            assert time.monotonic() < deadline, f"connection never became {state}"
            producer.poll(0.2)

    poll_until("up")
    own_broker.stop()
    poll_until("down")
    delivered: list[object] = []
    producer.produce(config.topic("tasks"), b"during the outage",
                     on_delivery=lambda err, msg: delivered.append(err))
    own_broker.start()
    poll_until("up")
    assert transport.flush(producer, 60) == 0
    assert delivered == [None]
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events.index("broker_connected") < events.index("broker_lost") < events.index("broker_back")


def test_an_inbox_reads_on_with_a_new_consumer_from_where_the_old_one_stopped(bootstrap: str) -> None:
    """Inbox.move then Inbox.replace: every message once, in order, across the change of
    consumer: those produced just before it (read by the old one or the new), and those
    produced once the new one reads; the old one is closed."""
    config = _config(bootstrap)
    topics.ensure_topics(transport.make_admin(config), topics.topic_specs(config))
    producer, _ = transport.make_producer(config, "test")
    topic = config.topic("tasks")

    def produce(first: int, count: int) -> None:
        for i in range(first, first + count):
            producer.produce(topic, f"m{i}".encode(), partition=1)
        assert transport.flush(producer, 30) == 0

    produce(0, 10)
    old, _ = transport.make_consumer(config, "test")
    inbox = Inbox(old)
    inbox.move({(topic, 1): 3})
    inbox.start()
    try:
        assert _take(inbox, 7) == [f"m{i}".encode() for i in range(3, 10)]
        new, _ = transport.make_consumer(config, "test")
        produce(10, 5)
        inbox.replace(new)
        _until(lambda: inbox.consumer is new, "the inbox to take the new consumer")
        produce(15, 5)
        assert _take(inbox, 10) == [f"m{i}".encode() for i in range(10, 20)]
        assert inbox.positions == {(topic, 1): 20}
        _until(lambda: _closed(old), "the old consumer to be closed")
    finally:
        inbox.stop()
        inbox.close()
        inbox.consumer.close()


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"waited 30 s for {what}"
        time.sleep(0.05)


def _closed(consumer: Consumer) -> bool:
    try:
        consumer.assignment()
    except RuntimeError:  # confluent-kafka: "Consumer closed"
        return True
    return False


def test_a_consumer_assigned_after_it_connected_knows_the_partitions_leader_at_once(
        bootstrap: str) -> None:
    """librdkafka learns the metadata of a topic assigned to a consumer that already connected
    only at its next scan of topics, up to a second later, and fetches nothing of it meanwhile
    (a placed worker lost up to a second of a burst): ``transport.assign`` asks for it at once.
    Seen in the first statistics librdkafka takes after ``assign`` returned: the partition's
    leader is known."""
    config = _config(bootstrap)
    topics.ensure_topics(transport.make_admin(config), topics.topic_specs(config))
    topic = config.topic("dispatch")
    stats: list[dict[str, Any]] = []
    settings = transport.consumer_settings(config, "test", transport.ConnectionMonitor("test"))
    settings.update({"stats_cb": lambda raw: stats.append(json.loads(raw)),
                     "statistics.interval.ms": 100})
    consumer = Consumer(settings)
    try:
        consumer.list_topics(config.topic("tasks"), timeout=30)  # connected; dispatch unknown
        transport.assign(consumer, {(topic, 1): 0}, timeout=30)  # a loaded machine's answer
        assigned = time.monotonic()
        stats.clear()
        # librdkafka's ``ts`` is its CLOCK_MONOTONIC in microseconds, as time.monotonic()
        _until(lambda: any(s["ts"] / 1e6 > assigned for s in consumer_stats(consumer, stats)),
               "statistics taken after the assignment")
        first = next(s for s in stats if s["ts"] / 1e6 > assigned)
        assert first["topics"][topic]["partitions"]["1"]["leader"] >= 0
    finally:
        consumer.close()


def consumer_stats(consumer: Consumer, stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The statistics received so far (a poll serves librdkafka's callbacks)."""
    consumer.poll(0.05)
    return stats


def test_an_inbox_reads_on_while_it_asks_for_partition_counts(
        bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The counts of a followed topic are asked through a client of their own, in a thread of
    their own: asked on the consumer in the reading thread, the question waited in the broker
    behind the fetch parked there (one request at a time per connection), and nothing was read
    meanwhile (issue 15: 116 ms every 5 s). Here the question's answer is held back: a message
    produced meanwhile is read all the same, and once the answer comes, the partition the topic
    gained meanwhile is read too."""
    config = _config(bootstrap)
    admin = transport.make_admin(config)
    topics.ensure_topics(admin, topics.topic_specs(config))
    topic = config.topic("tasks")
    asked, answer = threading.Event(), threading.Event()

    class HeldBack:
        """The inbox's metadata client: every answer waits until the test lets it through."""

        def list_topics(self, *args: Any, **kwargs: Any) -> Any:
            asked.set()
            answer.wait(60)
            return admin.list_topics(*args, **kwargs)

    monkeypatch.setattr(inbox_module, "FOLLOW_EVERY", 0.01)
    consumer, _ = transport.make_consumer(config, "test")
    inbox = Inbox(consumer, follow={topic: 2}, metadata=HeldBack())  # type: ignore[arg-type]
    inbox.move({(topic, 0): 0, (topic, 1): 0})
    inbox.start()
    try:
        assert asked.wait(30), "the inbox never asked for the partition counts"
        producer, _ = transport.make_producer(config, "test")
        producer.produce(topic, b"m0", partition=1)
        assert transport.flush(producer, 30) == 0
        assert _take(inbox, 1) == [b"m0"]  # read while the question waits
        for future in admin.create_partitions([NewPartitions(topic, 3)]).values():
            future.result(30)
        grown, _ = transport.make_producer(config, "test")  # knows the third partition
        grown.produce(topic, b"m1", partition=2)
        assert transport.flush(grown, 30) == 0
        answer.set()
        assert _take(inbox, 1) == [b"m1"]
        assert inbox.counts[topic] == 3 and inbox.positions[(topic, 2)] == 1
    finally:
        answer.set()
        inbox.stop()
        inbox.close()
        consumer.close()


def _take(inbox: Inbox, count: int) -> list[bytes]:
    """The values of the next ``count`` messages the inbox hands over (30 s at most)."""
    got: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(got) < count:
        assert time.monotonic() < deadline, f"read {got}"
        select.select([inbox.reader], [], [], 0.5)
        got += [msg.value() or b"" for msg in inbox.take()]
    return got
