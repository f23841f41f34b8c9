"""librdkafka settings built from the config: the user's passed through, the design's forced."""

from __future__ import annotations

from yadtqd import config as configuration
from yadtqd import transport
from yadtqd.messages.common import ENVELOPE_BYTES


def _config(**kafka: str) -> configuration.Config:
    env = {"YADTQ_KAFKA_BOOTSTRAP_SERVERS": "b:9092", **{f"YADTQ_KAFKA_{k}": v for k, v in kafka.items()}}
    return configuration.load(None, env=env)


def test_producer_forces_acks_all_and_idempotence_and_passes_the_rest() -> None:
    config = _config(ACKS="1", ENABLE_IDEMPOTENCE="false", SECURITY_PROTOCOL="SSL")
    settings = transport.producer_settings(config, "x", transport.ConnectionMonitor("x"))
    assert settings["acks"] == "all"
    assert settings["enable.idempotence"] is True
    assert settings["security.protocol"] == "SSL"
    assert settings["bootstrap.servers"] == "b:9092"


def test_a_producer_batch_fits_the_least_room_a_topic_may_have_unless_told() -> None:
    """A topic's max.message.bytes bounds a batch; the start-up check promises each topic the
    largest task or result plus the envelope, so batches stay within the smaller of the two."""
    def batch(**env: str) -> object:
        config = configuration.load(None, env={"YADTQ_KAFKA_BOOTSTRAP_SERVERS": "b:9092", **env})
        return transport.producer_settings(config, "x", transport.ConnectionMonitor("x"))["batch.size"]

    assert batch() == 512 * 1024 + ENVELOPE_BYTES
    assert batch(YADTQ_WORKER_MAX_RESULT_BYTES="1000") == 1000 + ENVELOPE_BYTES
    assert batch(YADTQ_SERVER_MAX_TASK_BYTES="2000000", YADTQ_WORKER_MAX_RESULT_BYTES="2000000",
                 YADTQ_KAFKA_MESSAGE_MAX_BYTES="4000000") == 1_000_000  # librdkafka's default
    assert batch(YADTQ_KAFKA_BATCH_SIZE="20000") == "20000"


def test_consumer_never_commits_offsets() -> None:
    config = _config(ENABLE_AUTO_COMMIT="true")
    settings = transport.consumer_settings(config, "x", transport.ConnectionMonitor("x"))
    assert settings["enable.auto.commit"] is False
    assert settings["enable.auto.offset.store"] is False


def test_consumer_fetches_at_most_4_mib_ahead_and_again_soon_unless_told() -> None:
    default = transport.consumer_settings(_config(), "x", transport.ConnectionMonitor("x"))
    assert default["queued.max.messages.kbytes"] == 4096
    assert default["fetch.queue.backoff.ms"] == 10  # not librdkafka's 1 s once 4 MiB wait
    told = transport.consumer_settings(
        _config(QUEUED_MAX_MESSAGES_KBYTES="65536", FETCH_QUEUE_BACKOFF_MS="100"), "x",
        transport.ConnectionMonitor("x"))
    assert told["queued.max.messages.kbytes"] == "65536" and told["fetch.queue.backoff.ms"] == "100"


def test_monitor_logs_each_change_once(caplog) -> None:  # type: ignore[no-untyped-def]
    import json
    import logging

    caplog.set_level(logging.INFO, logger="yadtqd.kafka")
    monitor = transport.ConnectionMonitor("c")
    up = json.dumps({"brokers": {"b/1": {"nodeid": 1, "state": "UP", "source": "learned"}}})
    down = json.dumps({"brokers": {"b/1": {"nodeid": 1, "state": "DOWN", "source": "learned"},
                                   "b/bootstrap": {"nodeid": -1, "state": "UP", "source": "configured"}}})
    for raw in (up, up, down, down, up):
        monitor.on_stats(raw)
    assert [r.event for r in caplog.records] == ["broker_connected", "broker_lost", "broker_back"]


def test_monitor_tells_a_client_that_knows_no_broker(caplog, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The statistics of the servers' group consumer stuck after a lone broker's stop (only its
    logical coordinator, without an address, left) against those of one that reconnected (the
    bootstrap broker added again): only the first is orphaned, and it is said once."""
    import json
    import logging

    monkeypatch.setattr(transport, "ORPHANED_AFTER", 0.0)
    caplog.set_level(logging.INFO, logger="yadtqd.kafka")
    coordinator = {"nodeid": -1, "state": "TRY_CONNECT", "source": "logical"}
    stuck = json.dumps({"brokers": {"GroupCoordinator": coordinator}})
    rebootstrapped = json.dumps({"brokers": {"GroupCoordinator": coordinator,
                                             "b/bootstrap": {"nodeid": -1, "state": "INIT",
                                                             "source": "configured"}}})
    monitor = transport.ConnectionMonitor("c")
    monitor.on_stats(rebootstrapped)
    assert not monitor.orphaned
    monitor.on_stats(stuck)
    monitor.on_stats(stuck)
    assert monitor.orphaned
    assert [r.event for r in caplog.records] == ["broker_orphaned"]
    monitor.on_stats(rebootstrapped)
    assert not monitor.orphaned


def test_a_moment_without_a_broker_is_not_orphaned() -> None:
    """A snapshot without brokers (as within a re-bootstrap) is not taken for the lasting
    state: the client counts as orphaned only after :data:`ORPHANED_AFTER` seconds of them."""
    import json

    monitor = transport.ConnectionMonitor("c")
    stuck = json.dumps({"brokers": {"GroupCoordinator": {"nodeid": -1, "state": "INIT",
                                                         "source": "logical"}}})
    monitor.on_stats(stuck)
    monitor.on_stats(stuck)
    assert not monitor.orphaned


def test_a_client_unconnected_while_its_sibling_is_connected_is_stuck() -> None:
    """ConnectionMonitor.stuck_beside: unconnected for STUCK_AFTER while a client of the same
    brokers was connected as long is stuck; either for less, or both unconnected (the broker is
    away), is not; orphaned is stuck whatever the sibling says."""
    now = 1000.0
    consumer, producer = transport.ConnectionMonitor("c"), transport.ConnectionMonitor("p")
    consumer.state, consumer.changed_at = "down", now - transport.STUCK_AFTER
    producer.state, producer.changed_at = "up", now - transport.STUCK_AFTER
    assert consumer.stuck_beside(producer, now) == (
        f"stayed unconnected for {transport.STUCK_AFTER:g} s while the p was connected")
    assert consumer.stuck_beside(producer, now - 1) == ""  # not yet that long
    producer.changed_at = now - 1
    assert consumer.stuck_beside(producer, now) == ""  # the sibling only just came back
    producer.state = "down"
    assert consumer.stuck_beside(producer, now + 60) == ""  # both away: the broker is
    consumer.state = "up"
    assert consumer.stuck_beside(producer, now + 60) == ""
    consumer.orphaned = True
    assert consumer.stuck_beside(producer, now) == "knew no broker"
