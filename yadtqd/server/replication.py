"""The server's changelog (DESIGN 13): one Kafka transaction per turn, and a store restored
from it.

Every turn of the server's loop ends in one Kafka transaction under the cluster's one
``transactional.id`` (``<prefix>.server``): the changelog records of every row the turn changed
(:mod:`yadtqd.changelog`) and the dispatch messages it caused (``run``, ``fenced``, ``alive``,
``refused``). Workers read ``dispatch`` with ``read_committed``, so a grant reaches a worker only
once its record is in the changelog. The offsets consumed from ``tasks`` and ``events`` are rows
of the store, so they are in the same transaction as the changes they caused.

SQLite commits first, so a result is readable at once; the rows a turn changed stay noted in the
store until Kafka committed them (:meth:`~yadtqd.store.Store.confirm`). A transaction that fails
is aborted, and the next one sends the noted rows (as they are by then) and the messages again
(workers drop repeats, invariant 5); a commit that times out (the broker away) is tried again
at the next turn, while the loop goes on, and aborted after 30 s. A transaction carries at most
5,000 rows: a backlog of notes goes in several. A server whose transactional producer is fenced
(a newer server took the ``transactional.id``) or failed for good stops being the active:
:class:`Fenced`; only the servers' group makes it active again.

At start, :meth:`Changelog.start` fences any older server and aborts its open transaction, and
:meth:`Changelog.restore` brings the store to the changelog's end: the tail after this file's
positions; or the whole changelog when the file is new, or when it holds changes the changelog
may lack (noted at start: the last turn before a crash). Those are dropped, and what caused them
is read again from ``tasks`` and ``events``, whose offsets come from the changelog too; tasks
never granted that only the file knew of (a socket submit during an outage) are submitted again
to ``tasks`` first. A file with rows the changelog lacks entirely (a database from before it)
is published, in chunks, resumed after a restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from yadtqd import changelog, transport
from yadtqd import messages as m
from yadtqd.config import Config
from yadtqd.errors import BadMessage, UnreachableError
from yadtqd.store import Store

log = logging.getLogger("yadtqd.server")
_payload = msgspec.json.Decoder(tuple[str, list, dict, m.Options])  # type: ignore[type-arg]

#: Seconds a turn waits for a transaction's commit before it goes on (and tries again later).
COMMIT_WAIT = 1.0
#: Rows one transaction carries at most (a large backlog of notes goes in several).
CHUNK = 5000
#: Seconds a transaction may stay open, being committed, before it is aborted and sent again
#: (below the broker's transaction timeout, which would abort it for us and fence the producer).
OPEN_LIMIT = 30.0
#: The broker's bound on an open transaction (librdkafka's default, said explicitly).
TRANSACTION_TIMEOUT_MS = 60_000
#: Errors that mean a newer server holds the ``transactional.id``.
FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED}
#: Changelog records applied per SQLite transaction while restoring.
RESTORE_BATCH = 2000


class Fenced(Exception):
    """This server's transactional producer can go on no more (a newer server took the
    cluster's ``transactional.id``, or the producer failed for good): it must stop granting,
    and may be active again only when the servers' group elects it anew."""


@dataclass(frozen=True)
class Outgoing:
    """A dispatch message waiting for the next transaction."""

    topic: str
    value: bytes
    key: str
    partition: int
    #: Sent before in an aborted transaction (counted undelivered once).
    retried: bool = False


class Changelog:
    """The server's transactional producer: changelog records and dispatch messages."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.topic = config.topic("changelog")
        self.transactional_id = config.topic("server")
        self.monitor = transport.ConnectionMonitor("server transactional producer")
        settings = transport.producer_settings(config, "server", self.monitor)
        settings["transactional.id"] = self.transactional_id
        settings["message.max.bytes"] = max(int(str(settings.get("message.max.bytes", 0))),
                                            changelog.record_bytes(config))
        settings["linger.ms"] = 0  # a commit sends the batch anyway: never wait for more
        settings.setdefault("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS)
        self.producer = Producer(settings)
        self._opened = 0.0
        #: Messages for the next transaction; those of the transaction being committed.
        self.queued: list[Outgoing] = []
        self.sending: list[Outgoing] = []
        self._notes: list[tuple[str, str, int]] = []
        self._positions: dict[int, int] = {}
        #: "idle", "committing" (a commit timed out: try again) or "aborting" (likewise).
        self.state = "idle"
        self.undelivered = 0
        self.commits = 0
        self.problem = ""

    # ------------------------------------------------------------ start

    def start(self, timeout: float = 60.0) -> None:
        """Take the ``transactional.id``: any older server's producer is fenced, and its open
        transaction aborted, before this one reads the changelog's end."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.producer.init_transactions(max(1.0, deadline - time.monotonic()))
                return
            except KafkaException as exc:
                err = exc.args[0]
                if not err.retriable() or time.monotonic() >= deadline:
                    raise UnreachableError(f"cannot take transactional.id {self.transactional_id}:"
                                           f" {err.str()}") from None

    def restore(self, store: Store, timeout: float = 3600.0, tick: Callable[[], None] = lambda: None) -> int:
        """Bring the store to the changelog's end; returns the records applied. ``tick`` is
        called after every batch (the watchdog is fed while a long changelog is read)."""
        monitor = transport.ConnectionMonitor("server-restore consumer")
        settings = transport.consumer_settings(self.config, "server-restore", monitor)
        settings["enable.partition.eof"] = True  # the end is where the last commit marker lies
        consumer = Consumer(settings)
        try:
            return self._restore(store, consumer, timeout, tick)
        finally:
            consumer.close()

    def _restore(self, store: Store, consumer: Consumer, timeout: float, tick: Callable[[], None]) -> int:
        partitions = transport.partition_count(consumer, self.topic, 10.0)
        ends = {p: transport.end_offset(consumer, self.topic, p, 10.0) for p in range(partitions)}
        positions = store.changelog_positions()
        if store.publishing():
            log.info("%s: publishing to %s goes on", store.path, self.topic)
            return 0
        if store.has_pending():
            log.warning("%s: its last changes may not have reached %s (the server stopped"
                        " between the two): rebuilding it from the changelog", store.path, self.topic,
                        extra={"event": "store_rebuild"})
            self._rebuild(store)
        elif not store.is_empty() and (not any(ends.values())
                                       or any(positions.get(p, 0) > ends[p] for p in ends)):
            log.warning("%s: publishing the whole database to %s, which lacks it (new, made"
                        " again, or shorter than this file has read)", store.path, self.topic,
                        extra={"event": "store_publish"})
            with store.transaction():
                store.note_all()
                store.set_publishing(True)
            return 0
        elif not store.is_empty() and not positions:
            log.warning("%s: holds rows but no changelog positions, and %s is not empty:"
                        " rebuilding it from the changelog", store.path, self.topic,
                        extra={"event": "store_rebuild"})
            self._rebuild(store)
        positions = store.changelog_positions()
        todo = {p for p in range(partitions) if positions.get(p, 0) < ends[p]}
        if not todo:
            return 0
        transport.assign(consumer, {(self.topic, p): positions.get(p, OFFSET_BEGINNING)
                                    for p in range(partitions)})
        applied, started = 0, time.monotonic()
        deadline = started + timeout
        while todo:
            batch = consumer.consume(RESTORE_BATCH, 0.05)  # a full batch, or what came: no idle wait
            applied += apply_batch(store, self.topic, batch)
            tick()
            for msg in batch:
                err, partition, offset = msg.error(), msg.partition() or 0, msg.offset() or 0
                if (err is not None and err.code() == KafkaError._PARTITION_EOF
                        or err is None and offset + 1 >= ends[partition]):
                    todo.discard(partition)
            if time.monotonic() > deadline:
                raise UnreachableError(f"cannot read {self.topic} to its end within {timeout:g} s"
                                       f" ({applied} records applied)")
        log.info("restored %d changelog records from %s in %.1f s", applied, self.topic,
                 time.monotonic() - started, extra={"event": "store_restored"})
        return applied

    def _rebuild(self, store: Store) -> None:
        """Wipe the file for a rebuild, submitting again the never-granted tasks that only it
        may know of (a socket submit during an outage, say)."""
        resubmit(self.config, store)
        with store.transaction():
            store.wipe()

    # ------------------------------------------------------------ each turn

    def send(self, topic: str, value: bytes, key: str, partition: int) -> None:
        """A dispatch message for the next transaction."""
        self.queued.append(Outgoing(topic, value, key, partition))

    def commit(self, store: Store, timeout: float = COMMIT_WAIT) -> bool:
        """Send the rows the store noted and the queued messages in one transaction and commit
        it; True once committed (or when there was nothing to send), False when it must be
        tried again (the next call does). Raises :class:`Fenced`."""
        if self.state == "aborting" and not self._abort(timeout):
            return False
        if self.state == "committing" and time.monotonic() - self._opened > OPEN_LIMIT:
            log.error("a changelog transaction stayed uncommitted for %.0f s: aborted, sent again"
                      " next turn", OPEN_LIMIT, extra={"event": "changelog_abort"})
            self.state = "aborting"
            self._abort(timeout)
            return False
        if self.state == "committing":
            return self._commit(store, timeout)
        changes, notes = store.pending_changes(CHUNK)
        if not changes and not self.queued:
            return True
        self._notes, self._positions = notes, {}
        self.sending, self.queued = self.queued, []
        try:
            self.producer.begin_transaction()
        except KafkaException as exc:
            self.queued, self.sending = self.sending + self.queued, []
            if exc.args[0].fatal():
                self._failed(exc.args[0], timeout)
            return False
        self.state, self._opened = "committing", time.monotonic()
        for change in changes:
            key, value = changelog.encode(change)
            problem = self._produce(self.topic, value, key, 0, self._delivered)
            if problem:  # the start checks sizes, so this is not expected: never confirm it
                log.critical("row %s/%s cannot be written to %s: %s; the transaction is aborted",
                             change.table, change.key, self.topic, problem,
                             extra={"event": "changelog_refused"})
                self.state = "aborting"
                self._abort(timeout)
                return False
        kept = []
        for out in self.sending:
            problem = self._produce(out.topic, out.value, out.key.encode(), out.partition)
            if problem and transport.TOO_LARGE in problem:
                self.undelivered += 1
                log.error("dispatch message for %s cannot be sent: %s", out.key, problem,
                          extra={"worker_id": out.key, "event": "undelivered"})
            elif problem:  # most likely a partition added since the producer read the topic
                kept.append(out)
                with contextlib.suppress(KafkaException):
                    self.producer.list_topics(out.topic, timeout=1.0)
        self.sending = [out for out in self.sending if out not in kept]
        self.queued = kept + self.queued
        return self._commit(store, timeout)

    def discard(self) -> None:
        """Drop what this producer holds (a term that ends): nothing left in flight, so
        nothing keeps it alive (a fenced producer may refuse even that)."""
        with contextlib.suppress(KafkaException):
            self.producer.purge()
            self.producer.flush(0)

    def take_undelivered(self) -> int:
        """Messages of aborted transactions since the last call (for the counters)."""
        count, self.undelivered = self.undelivered, 0
        return count

    def close(self, store: Store, timeout: float = 10.0) -> None:
        """Commit what is left (at shutdown): every transaction it takes, until nothing is
        open, noted or queued (a commit that only finished an earlier transaction, or a backlog
        over :data:`CHUNK` rows, needs more than one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.commit(store, min(COMMIT_WAIT * 3, max(0.1, deadline - time.monotonic())))
                    and self.state == "idle" and not self.queued and not store.has_pending()):
                return
        log.error("the last changes did not reach %s before shutdown: the next start rebuilds"
                  " the database from the changelog", self.topic)

    def _produce(self, topic: str, value: bytes | None, key: bytes, partition: int,
                 on_delivery: transport.OnDelivery | None = None) -> str | None:
        """Produce into the open transaction; returns why a message cannot be, if so."""
        while True:
            try:
                if on_delivery is None:
                    self.producer.produce(topic, value, key=key, partition=partition)
                else:
                    self.producer.produce(topic, value, key=key, partition=partition,
                                          on_delivery=on_delivery)
                return None
            except BufferError:
                self.producer.poll(0.1)  # the local queue is full: let deliveries drain it
            except KafkaException as exc:
                return f"{exc.args[0].name()}: {exc.args[0].str()}"

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            partition = msg.partition() or 0
            self._positions[partition] = max(self._positions.get(partition, 0), (msg.offset() or 0) + 1)

    def _commit(self, store: Store, timeout: float) -> bool:
        try:
            self.producer.commit_transaction(timeout)
        except KafkaException as exc:
            return self._failed(exc.args[0], timeout)
        self.state = "idle"
        store.confirm(self._notes, self._positions)
        self.sending, self._notes = [], []
        self.commits += 1
        if store.publishing() and not store.has_pending():
            with store.transaction():
                store.set_publishing(False)
            log.info("the whole database is in %s", self.topic, extra={"event": "store_published"})
        if self.problem:
            log.info("changelog transactions commit again", extra={"event": "changelog_back"})
            self.problem = ""
        return True

    def _failed(self, err: KafkaError, timeout: float) -> bool:
        if err.fatal() and err.code() in FENCED:
            raise Fenced(f"another server took transactional.id {self.transactional_id}"
                         f" ({err.str()}): this one stops granting")
        if err.fatal():  # a new producer must not fence a newer active: the group decides
            raise Fenced(f"the changelog producer failed for good ({err.str()})")
        if err.txn_requires_abort():
            self.state = "aborting"
            if not self.problem:
                log.error("a changelog transaction failed (%s): aborted, sent again next turn",
                          err.str(), extra={"event": "changelog_abort"})
            self.problem = err.str()
            self._abort(timeout)
            return False
        if not self.problem:
            log.warning("changelog commit not done yet (%s): trying again", err.str(),
                        extra={"event": "changelog_slow"})
        self.problem = err.str()
        return False

    def _abort(self, timeout: float) -> bool:
        try:
            self.producer.abort_transaction(timeout)
        except KafkaException as exc:
            if exc.args[0].fatal():
                return self._failed(exc.args[0], timeout)
            return False
        self.undelivered += sum(1 for out in self.sending if not out.retried)
        self.queued = [dataclasses.replace(out, retried=True) for out in self.sending] + self.queued
        self.sending, self.state = [], "idle"
        return True


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

    def __init__(self, config: Config, store: Store, timeout: float = 30.0) -> None:
        self.topic = config.topic("changelog")
        self.store = store
        monitor = transport.ConnectionMonitor("server standby consumer")
        self.consumer = Consumer(transport.consumer_settings(config, "server-standby", monitor))
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
        """Records not yet applied, as far as the last fetch knows (-1: not known yet)."""
        positions = self.store.changelog_positions()
        total = 0
        for tp in self.partitions:
            try:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                return -1
            if high < 0:
                return -1
            # the end is past the last commit marker, which no consumer position passes
            total += max(0, high - positions.get(tp.partition, 0) - 1)
        return total

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
