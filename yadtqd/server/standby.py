"""A standby's side of the changelog (DESIGN 13): records applied to the store as they come
(:class:`Follower`), in batches (:func:`apply_batch`, also used by the active's restore), and the
never-granted tasks only a file knows of submitted again before that file is wiped
(:func:`resubmit`)."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any

import msgspec
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

from yadtqd import changelog, transport
from yadtqd import messages as m
from yadtqd.config import Config
from yadtqd.errors import BadMessage, UnreachableError
from yadtqd.store import Store

log = logging.getLogger("yadtqd.server")
_payload = msgspec.json.Decoder(tuple[str, list, dict, m.Options])  # type: ignore[type-arg]

#: Where the changelog's end is asked of the broker: its last offset (for ``list_offsets``).
_LATEST = OffsetSpec.latest()  # type: ignore[no-untyped-call]
#: Changelog records applied per SQLite transaction while restoring or following.
RESTORE_BATCH = 2000
#: Seconds between two questions to the broker for the changelog's end (a standby's lag).
LAG_EVERY = 0.1
#: A standby's fetches wait for this many bytes (or ``fetch.wait.max.ms``, 100 ms): it applies
#: the changelog in batches at most a tenth of a second behind, rather than waking with the
#: active's every commit, on hosts where the active, a worker and the broker need the CPU at
#: that moment (sequential latency with a standby, p50 of 5 runs: 7.74 -> 7.09 ms here).
FOLLOW_MIN_BYTES = 1 << 20


def apply_batch(store: Store, topic: str, batch: list[Message]) -> int:
    """Apply a batch of changelog records, and the positions after them, in one transaction;
    bad records are skipped, logged and counted. Returns the changes applied."""
    changes, positions, bad = [], {}, 0
    for msg in batch:
        err, partition, offset = msg.error(), msg.partition() or 0, msg.offset() or 0
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("reading %s: %s", topic, err.str())
            continue
        positions[partition] = offset + 1
        if msg.key() == changelog.PRIME:
            continue
        try:
            changes.append(changelog.decode(msg.key(), msg.value()))
        except BadMessage as exc:
            bad += 1
            log.warning("skipped bad changelog record at %s[%d]@%d: %s", topic, partition, offset,
                        exc, extra={"event": "bad_message"})
    if positions:
        with store.transaction():
            store.apply_changes(changes)
            store.save_changelog_positions(positions)
            if bad:
                store.bump("bad_messages", bad)
    return len(changes)


class Follower:
    """A standby's replica: the changelog applied as it comes, so every read can be served
    here and a takeover has only the last records left to apply."""

    def __init__(self, config: Config, store: Store, admin: AdminClient, timeout: float = 30.0) -> None:
        self.topic = config.topic("changelog")
        self.store = store
        self.admin = admin
        self.monitor = monitor = transport.ConnectionMonitor("server standby consumer")
        settings = transport.consumer_settings(config, "server-standby", monitor)
        settings.setdefault("fetch.min.bytes", FOLLOW_MIN_BYTES)
        self.consumer = Consumer(settings)
        try:
            partitions = transport.partition_count(self.consumer, self.topic, timeout)
            ends = {p: transport.end_offset(self.consumer, self.topic, p, timeout)
                    for p in range(partitions)}
        except UnreachableError:
            self.consumer.close()
            raise
        positions = store.changelog_positions()
        if store.publishing():  # the only copy of rows the changelog lacks: never wiped
            log.warning("%s: rows are still being published to %s: kept as they are until this"
                        " server is active again", store.path, self.topic)
        elif store.has_pending() or (not positions and any(ends.values()) and not store.is_empty()):
            log.warning("%s: changes the changelog may lack, or rows without positions: rebuilding"
                        " it from %s", store.path, self.topic, extra={"event": "store_rebuild"})
            resubmit(config, store)
            with store.transaction():
                store.wipe()
            positions = {}
        self.partitions = [TopicPartition(self.topic, p, positions.get(p, OFFSET_BEGINNING))
                           for p in range(partitions)]
        self.consumer.assign(self.partitions)
        #: When the active wrote the newest record applied (its Kafka timestamp), if known.
        self.written: float | None = None
        #: The changelog's last stable offset per partition, when it was last asked, and the
        #: answers awaited.
        self._ends: dict[int, int] = {}
        self._asked = float("-inf")
        self._asking: dict[TopicPartition, concurrent.futures.Future[Any]] = {}

    def step(self, timeout: float) -> int:
        """Apply what arrived within ``timeout``; returns the changes applied."""
        batch = self.consumer.consume(RESTORE_BATCH, timeout)
        for msg in reversed(batch):
            kind, ms = msg.timestamp()
            if msg.error() is None and kind != TIMESTAMP_NOT_AVAILABLE:
                self.written = ms / 1000
                break
        return apply_batch(self.store, self.topic, batch)

    def lag_seconds(self, lag: int) -> float | None:
        """With ``lag`` records still to apply: the seconds since the active wrote the newest
        change applied here, by the two hosts' clocks (0 when nothing is left; None: not known)."""
        if lag == 0:
            return 0.0
        if lag < 0 or self.written is None:
            return None
        return round(max(0.0, time.time() - self.written), 3)

    def lag(self) -> int:
        """Records not yet applied (-1: not known yet). The end is the last stable offset,
        asked of the broker at most every :data:`LAG_EVERY` seconds through the admin client,
        whose answer is taken once it came (this never waits for it): asked on the consumer,
        the question waited in the broker behind the fetch parked there (one request at a time
        per connection; a standby's fetch waits for 1 MB or 100 ms), and the standby's loop
        with it. The high watermark a fetch brings would count the open transaction's
        placeholders the active keeps ahead of need
        (:meth:`yadtqd.server.replication.Changelog.prime`), which no reader sees until their
        commit."""
        if self._asking and all(f.done() for f in self._asking.values()):
            try:
                self._ends = {tp.partition: f.result().offset for tp, f in self._asking.items()}
            except KafkaException:
                self._ends = {}
            self._asking = {}
        now = time.monotonic()
        if not self._asking and now - self._asked >= LAG_EVERY:
            self._asked = now
            self._asking = self.admin.list_offsets(
                {TopicPartition(self.topic, tp.partition): _LATEST for tp in self.partitions},
                isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=10.0)
        if len(self._ends) < len(self.partitions) or min(self._ends.values()) < 0:
            return -1
        positions = self.store.changelog_positions()
        # the end is past the last commit marker, which no position applied passes
        return sum(max(0, end - positions.get(p, 0) - 1) for p, end in self._ends.items())

    def close(self) -> None:
        """Stop reading."""
        self.consumer.close()


def resubmit(config: Config, store: Store, timeout: float = 30.0) -> int:
    """Submit again, to ``tasks``, the never-granted tasks the file noted and the changelog may
    lack: whoever is active records them (or finds them known: intake is idempotent)."""
    rows = store.salvage()
    if not rows:
        return 0
    producer, _ = transport.make_producer(config, "server-resubmit")
    messages = []
    for row in rows:
        task, args, kwargs, options = _payload.decode(row["payload"])
        sub = m.Submission(task_id=row["id"], task=task, args=args, kwargs=kwargs, options=options,
                           submitted_at=row["submitted_at"])
        messages.append((m.encode(sub), sub.task_id))
    problem = transport.deliver_all(producer, config.topic("tasks"), messages, timeout)
    if problem:
        producer.purge()
        producer.flush(0)
        raise UnreachableError(f"cannot submit again {len(rows)} tasks only this database knows"
                               f" of ({problem})")
    log.warning("submitted again %d never-granted tasks the changelog may lack", len(rows),
                extra={"event": "resubmitted"})
    return len(rows)
