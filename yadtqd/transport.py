"""The Kafka transport: every producer, consumer and admin client YADTQ makes comes from here.

``[kafka]`` settings are passed to librdkafka unchanged; this module adds only what the design
requires (``acks=all`` and idempotence on producers, no group offsets on consumers) and watches
each client's broker connection so that "connected", "lost" and "back" are logged once each.
Consumers use manual partition assignment: no consumer group membership, no rebalances, and
offsets are the application's (DESIGN sections 2 and 4.6).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from yadtqd.config import Config
from yadtqd.errors import ConfigError, UnreachableError
from yadtqd.log import LIBRDKAFKA
from yadtqd.messages.common import ENVELOPE_BYTES, PRODUCER_DEFAULT_MAX

log = logging.getLogger("yadtqd.kafka")

STATS_INTERVAL_MS = 1000
#: Milliseconds a consumer whose queue of fetched messages is full waits before it fetches again
#: (librdkafka's ``fetch.queue.backoff.ms``, 1,000 by default).
FETCH_QUEUE_BACKOFF_MS = 10
_DOWN_CODES = {KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE}
#: Seconds a client's statistics must show no broker before it counts as orphaned (a moment
#: without one, within a re-bootstrap, is not; the state measured never ended).
ORPHANED_AFTER = 3.0
#: Where a broker a client can connect to comes from, in librdkafka's statistics (the others:
#: ``logical``, a coordinator's handle with no address of its own, and ``internal``).
_REAL_SOURCES = {"configured", "learned"}
#: Seconds a client may stay unconnected while a client of the same brokers is connected, before
#: it is taken for stuck and replaced (a client merely reconnecting takes about one).
STUCK_AFTER = 15.0
#: Seconds :func:`assign` waits for the metadata of the topics it assigns.
METADATA_WAIT = 1.0


class ConnectionMonitor:
    """Follows one client's broker connection and logs each change of state once.

    librdkafka reports trouble through ``error_cb`` and the state of every broker connection
    through ``stats_cb``; together they give "connected", "lost" and "back" without polling.

    The statistics also show a client left with no broker to connect to (:attr:`orphaned`):
    librdkafka drops every broker a metadata response does not list, and a lone broker shutting
    down answers with none (measured here with Kafka 4.2 and librdkafka 2.16: the servers'
    group consumer, after a ``NOT_COORDINATOR`` at the broker's stop, knew only its logical
    coordinator, which has no address, and never connected again). Only a new client recovers.
    """

    def __init__(self, client: str) -> None:
        self.client = client
        self.state = "connecting"
        self.changed_at = time.monotonic()
        #: librdkafka has known no broker to connect to for :data:`ORPHANED_AFTER` seconds:
        #: nothing but a new client connects again.
        self.orphaned = False
        self._brokerless_since: float | None = None

    @property
    def up(self) -> bool:
        """True while at least one broker connection of this client is up."""
        return self.state == "up"

    def on_error(self, err: KafkaError) -> None:
        """librdkafka's ``error_cb``."""
        if err.code() in _DOWN_CODES:
            self._set("down", err.str())
        elif err.fatal():
            log.critical("kafka %s: fatal error: %s", self.client, err.str())
        else:
            log.warning("kafka %s: %s", self.client, err.str())

    def on_stats(self, raw: str) -> None:
        """librdkafka's ``stats_cb``: any real broker in state UP means connected."""
        brokers = json.loads(raw).get("brokers", {}).values()
        if any(b.get("source") in _REAL_SOURCES for b in brokers):
            self._brokerless_since = None
        elif self._brokerless_since is None:
            self._brokerless_since = time.monotonic()
        since = self._brokerless_since
        orphaned = since is not None and time.monotonic() - since >= ORPHANED_AFTER
        if orphaned and not self.orphaned:
            log.error("kafka %s: the client knows no broker any more (a metadata response listed"
                      " none, as a lone broker shutting down sends), so it cannot connect again",
                      self.client, extra={"event": "broker_orphaned"})
        self.orphaned = orphaned
        up = any(b.get("nodeid", -1) >= 0 and b.get("state") == "UP" for b in brokers)
        if up:
            self._set("up", "")
        elif self.state == "up":
            self._set("down", "no broker connection is up")

    def stuck_beside(self, sibling: ConnectionMonitor, mono: float | None = None) -> str:
        """Why this client must be replaced by a new one, if it must ("" if not). librdkafka
        (2.16) leaves a client unable to connect in two ways measured here: it knows no broker
        (:attr:`orphaned`), or, after the broker was frozen (SIGSTOP) for 25 s, a connection of
        it timed out and it never connected again while the process's other clients did (the
        servers' group consumer, its coordinator's connection; a worker's consumer, moved to
        another partition). The second is told by ``sibling``, a client of the same brokers:
        connected for :data:`STUCK_AFTER` seconds while this one was not."""
        if self.orphaned:
            return "knew no broker"
        mono = time.monotonic() if mono is None else mono
        if (not self.up and sibling.up
                and min(mono - self.changed_at, mono - sibling.changed_at) >= STUCK_AFTER):
            return f"stayed unconnected for {STUCK_AFTER:g} s while the {sibling.client} was connected"
        return ""

    def _set(self, state: str, detail: str) -> None:
        if state == self.state:
            return
        previous, self.state = self.state, state
        self.changed_at = time.monotonic()
        if state == "up":
            event = "back" if previous == "down" else "connected"
            log.info("kafka %s: broker connection %s", self.client, event,
                     extra={"event": f"broker_{event}"})
        else:
            log.warning("kafka %s: broker connection lost: %s", self.client, detail,
                        extra={"event": "broker_lost"})


def close_later(clients: list[Consumer | Producer], name: str) -> None:
    """Close clients replaced by new ones, in a thread of their own: a stuck client's close may
    wait long (a consumer's, for a coordinator it can no longer reach). A producer drops what it
    still holds: whatever replaced it sends again what must be sent."""
    threading.Thread(target=_close, args=(clients,), name=name, daemon=True).start()


def _close(clients: list[Consumer | Producer]) -> None:
    for client in clients:
        with contextlib.suppress(KafkaException, RuntimeError):
            if isinstance(client, Consumer):
                client.close()
            else:
                client.purge()
                client.flush(0)


def _base(config: Config, client: str, monitor: ConnectionMonitor) -> dict[str, object]:
    settings: dict[str, object] = dict(config.kafka)
    settings.setdefault("client.id", f"yadtq-{client}")
    settings["error_cb"] = monitor.on_error
    settings["stats_cb"] = monitor.on_stats
    settings["logger"] = logging.getLogger(LIBRDKAFKA)
    settings.setdefault("statistics.interval.ms", STATS_INTERVAL_MS)
    return settings


def producer_settings(config: Config, client: str, monitor: ConnectionMonitor) -> dict[str, object]:
    """librdkafka settings of a producer: the user's, with ``acks=all`` and idempotence forced,
    and batches no larger than every topic is sure to take (:func:`batch_bytes`)."""
    settings = _base(config, client, monitor)
    settings.update({"acks": "all", "enable.idempotence": True})
    settings.setdefault("linger.ms", 1)
    settings.setdefault("batch.size", batch_bytes(config))
    return settings


def batch_bytes(config: Config) -> int:
    """The most bytes a producer puts in one batch for one partition. A topic's
    ``max.message.bytes`` bounds a whole batch, not one message, and the broker refuses a batch
    over it with every message in it; the start-up check only promises each topic room for the
    largest task or result the configuration allows plus ``ENVELOPE_BYTES``. So many small
    messages at once (a ``bye`` in parts, a burst of grants to one worker, outcomes batched by
    the linger) could make a batch that a topic made with that little room refuses. librdkafka
    still sends a message larger than this alone."""
    least = min(config.server.max_task_bytes, config.worker.max_result_bytes) + ENVELOPE_BYTES
    return min(least, PRODUCER_DEFAULT_MAX)


def consumer_settings(config: Config, client: str, monitor: ConnectionMonitor) -> dict[str, object]:
    """librdkafka settings of a consumer: the user's, with offset commits forced off, an
    offset that fell out of retention read from the earliest one left (librdkafka's default,
    ``latest``, would skip every message still in the partition), and only committed
    transactions read (a ``run`` is visible once its grant is in the changelog, DESIGN 13)."""
    settings = _base(config, client, monitor)
    settings.setdefault("group.id", f"{config.topic_prefix}.{client}")
    settings.update({"enable.auto.commit": False, "enable.auto.offset.store": False,
                     "auto.offset.reset": "earliest", "isolation.level": "read_committed"})
    settings.setdefault("fetch.wait.max.ms", 100)
    # the messages fetched ahead of the application: librdkafka's default (up to 64 MiB, 100,000
    # messages a partition) made a burst of 100,000 submissions cost the server 35 MiB for a
    # moment, and glibc keeps such peaks (issue 14)
    settings.setdefault("queued.max.messages.kbytes", 4096)
    # with that much queued, librdkafka looks for room to fetch again only after this pause, 1 s
    # by default: of records of kilobytes (the changelog's rows, tasks with large arguments)
    # 4 MiB is a fraction of a second of work, and the consumer then waited the rest of the
    # second with nothing to read (issue 15, bench/catchup.py: a standby's rebuild of 60,000
    # tasks 16.7 -> 2.6..2.8 s; tasks with 8 KB arguments 1,069..1,129 -> 1,625..1,737 a second).
    settings.setdefault("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
    settings.setdefault("enable.partition.eof", False)
    return settings


def check_settings(config: Config) -> None:
    """Refuse (:class:`ConfigError`) a ``[kafka]`` setting librdkafka does not know or whose value
    it rejects, naming the key and where it came from: librdkafka checks them when a client is
    made, so one is made here and thrown away."""
    for make in (Producer, Consumer):
        settings: dict[str, object] = dict(config.kafka)
        settings.setdefault("group.id", "yadtq.settings-check")
        settings["log_level"] = 0  # a throwaway client: none of its chatter
        try:
            make(settings).close() if make is Consumer else make(settings)
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() == KafkaError._INVALID_ARG:  # an unknown key or a rejected value
                raise ConfigError(_setting_problem(config, err.str())) from None
            raise UnreachableError(f"cannot make a Kafka client: {err.str()}") from None


def _setting_problem(config: Config, problem: str) -> str:
    """librdkafka's complaint, led by where the key it names came from."""
    found = re.search(r'property:? "?([A-Za-z0-9._-]+)"?', problem)
    key = found.group(1) if found else ""
    where = config.kafka_sources.get(key, f"{config.source}: [kafka]")
    hint = ""
    if key == "topic_prefix":
        hint = " (topic_prefix is a top-level key: put it before [kafka])"
    elif key in {"database", "socket", "id", "slots"}:
        hint = " (a YADTQ setting: it belongs in [server] or [worker], not [kafka])"
    return f"{where}: {problem}{hint}"


def make_producer(config: Config, client: str, linger_ms: int = 1) -> tuple[Producer, ConnectionMonitor]:
    """A producer with ``acks=all`` and idempotence, as the design requires. ``linger_ms`` is
    the default wait to batch (a ``[kafka] "linger.ms"`` setting overrides it): 0 for a
    producer that sends one message and waits for it."""
    monitor = ConnectionMonitor(f"{client} producer")
    settings = producer_settings(config, client, monitor)
    if "linger.ms" not in config.kafka:
        settings["linger.ms"] = linger_ms
    return Producer(settings), monitor


def make_consumer(config: Config, client: str) -> tuple[Consumer, ConnectionMonitor]:
    """A consumer for manual assignment: never commits, never joins a group's rebalances."""
    monitor = ConnectionMonitor(f"{client} consumer")
    return Consumer(consumer_settings(config, client, monitor)), monitor


def make_admin(config: Config) -> AdminClient:
    """An admin client with the same connection settings; what librdkafka says of it goes
    through the daemon's log, as every other client's does (not raw to stderr, where a broker
    outage would add a line a second without priority or fields)."""
    settings: dict[str, Any] = dict(config.kafka)
    settings.setdefault("client.id", "yadtq-admin")
    settings["logger"] = logging.getLogger(LIBRDKAFKA)
    return AdminClient(settings)


def partition_count(client: Consumer | Producer | AdminClient, topic: str, timeout: float = 30.0) -> int:
    """The number of partitions of a topic; waits for the broker up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            meta = client.list_topics(topic, timeout=max(0.1, deadline - time.monotonic()))
            info = meta.topics[topic]
            if info.error is None and info.partitions:
                return len(info.partitions)
            problem = info.error.str() if info.error else "no partitions"
        except KafkaException as exc:
            problem = exc.args[0].str()
        if time.monotonic() >= deadline:
            raise UnreachableError(f"cannot read metadata of topic {topic}: {problem}")
        time.sleep(0.2)  # topic metadata propagating; there is no event to wait on


def partition_for(key: str, count: int) -> int:
    """The partition of ``dispatch`` and ``events`` that belongs to a worker id."""
    return zlib.crc32(key.encode()) % count


def least_read(home: int, readers: Mapping[int, int], count: int) -> int:
    """The ``dispatch`` partition for an epoch that may read any of the first ``count``:
    ``home`` unless another partition has fewer ``readers`` (live epochs of other workers), then
    the lowest-numbered of those with fewest. Workers sharing a partition each fetch all of its
    messages, so this spreads them while it can."""
    if count <= 0 or not 0 <= home < count:
        return home
    fewest = min(range(count), key=lambda p: (readers.get(p, 0), p))
    return home if readers.get(home, 0) <= readers.get(fewest, 0) else fewest


def end_offset(consumer: Consumer, topic: str, partition: int, timeout: float = 30.0) -> int:
    """The partition's high watermark (for a ``read_committed`` consumer, the last stable
    offset): the offset the next message will get; waits for the broker (and for a topic just
    created to get its leader) up to ``timeout``."""
    return _watermarks(consumer, topic, partition, timeout, "end")[1]


def assign(consumer: Consumer, positions: Mapping[tuple[str, int], int],
           timeout: float = METADATA_WAIT) -> None:
    """Assign exactly these partitions, each to start at the given offset, and ask the
    broker for their topics' metadata at once (``timeout`` seconds at most; if the broker
    is away, the consumer asks again itself).

    A consumer that connected before it was assigned a topic it knows nothing of fetches
    nothing of it until librdkafka's next scan of its topics, up to a second later: for 4 of 6
    fresh consumers assigned here 0.3 s after they connected, the first message came after
    704 ms, against 2 to 10 ms with the metadata asked for. A worker placed on a partition
    (a new consumer, assigned by the inbox's thread) so lost up to a second of a burst.
    """
    consumer.assign([TopicPartition(t, p, off) for (t, p), off in positions.items()])
    for topic in sorted({t for t, _ in positions}):
        try:
            consumer.list_topics(topic, timeout=timeout)
        except KafkaException:
            pass  # the broker is away: the consumer's own scan asks again


OnDelivery = Callable[[KafkaError | None, Message], None]
#: The name of librdkafka's error for a message over ``message.max.bytes`` (in :func:`send`'s
#: problems): such a message can never be sent.
TOO_LARGE = "MSG_SIZE_TOO_LARGE"


def send(producer: Producer, topic: str, value: bytes, key: str, partition: int = -1,
         on_delivery: OnDelivery | None = None) -> str | None:
    """Queue a message for delivery, waiting for room when the local queue is full.

    Returns None once queued, or why the message can never be sent (too large for the
    producer, an unknown partition): the caller decides what that means, the daemon goes on.
    ``on_delivery`` gets librdkafka's delivery report, from a later ``poll`` or ``flush``.
    """
    while True:
        try:
            if on_delivery is None:
                producer.produce(topic, value, key=key.encode(), partition=partition)
            else:
                producer.produce(topic, value, key=key.encode(), partition=partition,
                                 on_delivery=on_delivery)
            return None
        except BufferError:
            producer.poll(0.1)  # the local queue is full: let deliveries drain it
        except KafkaException as exc:
            return f"{exc.args[0].name()}: {exc.args[0].str()}"


def low_offset(consumer: Consumer, topic: str, partition: int, timeout: float = 30.0) -> int:
    """The partition's low watermark: the oldest offset still kept; waits for the broker (and
    for a topic just created to get its leaders) up to ``timeout``."""
    return _watermarks(consumer, topic, partition, timeout, "start")[0]


def _watermarks(consumer: Consumer, topic: str, partition: int, timeout: float,
                which: str) -> tuple[int, int]:
    """The partition's (low, high) watermarks, asked again until ``timeout``; ``which`` names
    the one wanted, in the error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                       timeout=max(0.1, deadline - time.monotonic()))
            return int(low), int(high)
        except KafkaException as exc:
            if time.monotonic() >= deadline:
                raise UnreachableError(f"cannot read the {which} of {topic}[{partition}]:"
                                       f" {exc.args[0].str()}") from None
        time.sleep(0.2)  # leaders of a new topic propagating; there is no event to wait on


def deliver_all(producer: Producer, topic: str, messages: list[tuple[bytes, str]],
                timeout: float) -> str | None:
    """Produce (value, key) messages and wait until Kafka acknowledged them all; returns the
    problem, if any (the last one seen, or how many were not acknowledged in time)."""
    failed: list[str] = []

    def delivered(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            failed.append(err.str())

    for value, key in messages:
        problem = send(producer, topic, value, key, on_delivery=delivered)
        if problem:
            failed.append(problem)
    left = producer.flush(timeout)
    if failed or left:
        return failed[-1] if failed else f"{left} not acknowledged within {timeout:g} s"
    return None


def deliver(producer: Producer, topic: str, value: bytes, key: str, timeout: float) -> str | None:
    """Produce one message and wait until Kafka acknowledged it; returns the problem, if any."""
    done = threading.Event()
    errors: list[KafkaError | None] = []

    def delivered(err: KafkaError | None, _msg: object) -> None:
        errors.append(err)
        done.set()

    producer.produce(topic, value, key=key.encode(), on_delivery=delivered)
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        producer.poll(0.05)
    if not done.is_set():
        return f"no acknowledgement within {timeout:g} s"
    return errors[0].str() if errors[0] is not None else None


def read_batch(consumer: Consumer, timeout: float, limit: int) -> list[Message]:
    """Wait up to ``timeout`` for one message, then take what else is ready, up to ``limit``.

    ``consume(limit, timeout)`` alone would wait for a full batch; this returns as soon as
    anything arrives. Read errors are logged and left out.
    """
    first = consumer.poll(timeout)
    if first is None:
        return []
    good = []
    for msg in [first, *consumer.consume(limit - 1, 0)]:
        err = msg.error()
        if err is not None:
            log.warning("read error: %s", err.str())
        else:
            good.append(msg)
    return good


def flush(producer: Producer, timeout: float) -> int:
    """Deliver what was accepted; return how many messages are still undelivered."""
    left = producer.flush(timeout)
    if left:
        log.error("%d messages were not delivered to Kafka before shutdown", left)
    return int(left)
