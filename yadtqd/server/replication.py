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
at the next turn, while the loop goes on. A server whose transactional producer is fenced (a
newer server took the ``transactional.id``) stops: :class:`Fenced`.

At start, :meth:`Changelog.start` fences any older server and aborts its open transaction, and
:meth:`Changelog.restore` brings the store to the changelog's end: the tail after this file's
positions; or the whole changelog when the file is new, or when it holds changes the changelog
may lack (noted at start: the last turn before a crash). Those are dropped, and what caused them
is read again from ``tasks`` and ``events``, whose offsets come from the changelog too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer

from yadtqd import changelog, transport
from yadtqd.config import Config
from yadtqd.errors import BadMessage, UnreachableError
from yadtqd.store import Store

log = logging.getLogger("yadtqd.server")

#: Seconds a turn waits for a transaction's commit before it goes on (and tries again later).
COMMIT_WAIT = 1.0
#: Errors that mean a newer server holds the ``transactional.id``.
FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED}
#: Changelog records applied per SQLite transaction while restoring.
RESTORE_BATCH = 2000


class Fenced(Exception):
    """A newer server took the cluster's ``transactional.id``: this one must stop granting."""


@dataclass(frozen=True)
class Outgoing:
    """A dispatch message waiting for the next transaction."""

    topic: str
    value: bytes
    key: str
    partition: int


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
        self._settings = settings
        self.producer = Producer(settings)
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

    def restore(self, store: Store, timeout: float = 300.0) -> int:
        """Bring the store to the changelog's end; returns the records applied."""
        monitor = transport.ConnectionMonitor("server-restore consumer")
        settings = transport.consumer_settings(self.config, "server-restore", monitor)
        settings["enable.partition.eof"] = True  # the end is where the last commit marker lies
        consumer = Consumer(settings)
        try:
            return self._restore(store, consumer, timeout)
        finally:
            consumer.close()

    def _restore(self, store: Store, consumer: Consumer, timeout: float) -> int:
        partitions = transport.partition_count(consumer, self.topic)
        ends = {p: transport.end_offset(consumer, self.topic, p) for p in range(partitions)}
        if store.has_pending():
            log.warning("%s: its last changes may not have reached %s (the server stopped"
                        " between the two): rebuilding it from the changelog", store.path, self.topic,
                        extra={"event": "store_rebuild"})
            with store.transaction():
                store.wipe()
        elif not store.is_empty() and not any(ends.values()):
            log.warning("%s: publishing the whole database to %s, which holds nothing (new, or"
                        " made again)", store.path, self.topic, extra={"event": "store_publish"})
            with store.transaction():
                store.note_all()
            return 0
        elif not store.is_empty() and not store.changelog_positions():
            log.warning("%s: holds rows but no changelog positions, and %s is not empty:"
                        " rebuilding it from the changelog", store.path, self.topic,
                        extra={"event": "store_rebuild"})
            with store.transaction():
                store.wipe()
        positions = store.changelog_positions()
        todo = {p for p in range(partitions) if positions.get(p, 0) < ends[p]}
        if not todo:
            return 0
        transport.assign(consumer, {(self.topic, p): positions.get(p, OFFSET_BEGINNING)
                                    for p in range(partitions)})
        applied, started = 0, time.monotonic()
        deadline = started + timeout
        while todo:
            batch = consumer.consume(RESTORE_BATCH, 1.0)
            applied += self._apply(store, batch, todo, ends)
            if time.monotonic() > deadline:
                raise UnreachableError(f"cannot read {self.topic} to its end within {timeout:g} s"
                                       f" ({applied} records applied)")
        log.info("restored %d changelog records from %s in %.1f s", applied, self.topic,
                 time.monotonic() - started, extra={"event": "store_restored"})
        return applied

    def _apply(self, store: Store, batch: list[Message], todo: set[int], ends: dict[int, int]) -> int:
        changes, positions, bad = [], {}, 0
        for msg in batch:
            err, partition, offset = msg.error(), msg.partition() or 0, msg.offset() or 0
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    todo.discard(partition)
                else:
                    log.warning("reading %s: %s", self.topic, err.str())
                continue
            positions[partition] = offset + 1
            if offset + 1 >= ends[partition]:
                todo.discard(partition)
            try:
                changes.append(changelog.decode(msg.key(), msg.value()))
            except BadMessage as exc:
                bad += 1
                log.warning("skipped bad changelog record at %s[%d]@%d: %s", self.topic,
                            partition, offset, exc, extra={"event": "bad_message"})
        if positions:
            with store.transaction():
                store.apply_changes(changes)
                store.save_changelog_positions(positions)
                if bad:
                    store.bump("bad_messages", bad)
        return len(changes)

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
        if self.state == "committing":
            return self._commit(store, timeout)
        changes, notes = store.pending_changes()
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
        self.state = "committing"
        for change in changes:
            key, value = changelog.encode(change)
            problem = self._produce(self.topic, value, key, 0, self._delivered)
            if problem:  # the start checks sizes, so this is not expected
                log.critical("row %s/%s cannot be written to %s: %s", change.table, change.key,
                             self.topic, problem, extra={"event": "changelog_refused"})
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

    def take_undelivered(self) -> int:
        """Messages of aborted transactions since the last call (for the counters)."""
        count, self.undelivered = self.undelivered, 0
        return count

    def close(self, store: Store, timeout: float = 10.0) -> None:
        """Commit what is left (at shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.commit(store, min(COMMIT_WAIT * 3, max(0.1, deadline - time.monotonic()))):
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
        store.confirm(self._notes, self._positions)
        self.state, self.sending, self._notes = "idle", [], []
        self.commits += 1
        if self.problem:
            log.info("changelog transactions commit again", extra={"event": "changelog_back"})
            self.problem = ""
        return True

    def _failed(self, err: KafkaError, timeout: float) -> bool:
        if err.fatal() and err.code() in FENCED:
            raise Fenced(f"another server took transactional.id {self.transactional_id}"
                         f" ({err.str()}): this one stops granting")
        if err.fatal():
            self._renew(err)
            return False
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

    def _renew(self, err: KafkaError) -> None:
        """A producer that failed for good without being fenced (a transaction the broker lost
        track of across an outage, say): a new one takes the ``transactional.id`` again, and
        the noted rows and the messages go in its first transaction. Sending them twice is
        harmless: records are whole rows, and workers drop repeated messages."""
        log.error("the changelog producer failed (%s): starting a new one; its first transaction"
                  " sends again what may not have been committed", err.str(),
                  extra={"event": "changelog_renew"})
        self.queued, self.sending, self.state = self.sending + self.queued, [], "idle"
        self.producer = Producer(self._settings)
        self.start()

    def _abort(self, timeout: float) -> bool:
        try:
            self.producer.abort_transaction(timeout)
        except KafkaException as exc:
            if exc.args[0].fatal():
                return self._failed(exc.args[0], timeout)
            return False
        self.undelivered += len(self.sending)
        self.queued, self.sending, self.state = self.sending + self.queued, [], "idle"
        return True
