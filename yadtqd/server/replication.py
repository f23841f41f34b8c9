"""The server's changelog (DESIGN 13): one Kafka transaction per turn, and a store restored
from it.

Every turn of the server's loop ends in one Kafka transaction, under the cluster's two
``transactional.id`` in turns (``<prefix>.server`` and ``<prefix>.server.2``, see
:data:`TURNS`; one transaction open at a time): the changelog records of every row the turn changed
(:mod:`yadtqd.changelog`) and the dispatch messages it caused (``run``, ``cancel``, ``fenced``,
``alive``, ``left``, ``refused``). Workers read ``dispatch`` with ``read_committed``, so a grant
reaches a worker only once its record is in the changelog. The offsets consumed from ``tasks``
and ``events`` are rows of the store, so they are in the same transaction as the changes they
caused.

SQLite commits first, so a result is readable at once; the rows a turn changed stay noted in the
store until Kafka committed them (:meth:`~yadtqd.store.Store.confirm`). A commit waits in a
thread of its own, not in the loop: while it does, the next turns record their work in SQLite,
and their rows and messages go in the next transaction, begun when the commit is done (the
thread wakes the loop). A transaction that fails is aborted, and the next one sends the noted
rows (as they are by then) and the messages again (workers drop repeats, invariant 5); a commit
that times out (the broker away) is tried again at the next turn, while the loop goes on, and
after 30 s aborted if librdkafka lets it (not while a commit call is open: then librdkafka ends
the commit itself within the transaction's timeout). A transaction carries at most
5,000 rows: a backlog of notes goes in several, oldest first, and the dispatch messages wait
for the last (a ``run`` never reaches a worker before its grant's record). A server either of
whose transactional producers is fenced (a newer server took the ``transactional.id``) or failed
for good stops being the active: :class:`Fenced`; only the servers' group makes it active again.

The next transaction begins only once the last one's commit (or abort) returned, so its records follow the
last one's in every partition, and a ``read_committed`` reader sees them after the last one's
even if the coordinator writes the markers of the two out of order.

At start, :meth:`Changelog.start` fences any older server (both ids: it takes them one after the
other, and a transaction the older one committed meanwhile is before the end read next) and
aborts its open transactions, and :meth:`Changelog.restore` brings the store to the changelog's
end (:mod:`yadtqd.server.restore`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from yadtqd import changelog, transport
from yadtqd import messages as m
from yadtqd.config import Config
from yadtqd.errors import UnreachableError
from yadtqd.server.restore import restore
from yadtqd.store import Store

log = logging.getLogger("yadtqd.server")

#: Seconds a turn waits for a transaction's commit before it goes on (and tries again later).
COMMIT_WAIT = 1.0
#: Notes of changed rows one transaction reads at most (a large backlog goes in several).
CHUNK = 5000
#: Notes past which a backlog keeps only the newest of each row (Kafka refusing commits for
#: long while the loop goes on: notes grow with every change, heartbeats included).
NOTES_LIMIT = 100_000
#: Seconds a transaction may stay open, being committed, before it is aborted and sent again
#: (below the broker's transaction timeout, which would abort it for us and fence the producer),
#: if librdkafka lets it: not while a commit call is open, which is the common case (a commit
#: that timed out); that commit then goes on, and ends within the transaction's timeout.
OPEN_LIMIT = 30.0
#: Seconds a transaction opened ahead of need (:meth:`Changelog.prime`) may wait for work
#: before it is committed as it is (far below the broker's transaction timeout).
PRIME_LIMIT = 5.0
#: Seconds rows that no dispatch message waits on (results, offsets) may wait for the next
#: transaction: on a task's path its finish then rides with the next grant, one commit for two.
LINGER = 0.02
#: The suffixes of the two ``transactional.id`` (``<prefix>.server``, ``<prefix>.server.2``),
#: whose producers carry the transactions in turns. Until the coordinator has written a
#: commit's markers it answers "not yet" (CONCURRENT_TRANSACTIONS) to the same id's next
#: transaction, and librdkafka then waits a fixed 20 ms before asking again: with one producer,
#: a task granted in that window waited for it (issue 15: 1 % of sequential tasks beside a
#: standby, whose broker writes markers slower). The other id's coordinator state is its own.
TURNS = ("", ".2")
#: Seconds after a commit before the next transaction is opened ahead of need, on the other
#: producer: work that comes sooner begins it anyway (under load, a turn's work always does, and
#: a transaction opened ahead of need would only add placeholders).
SETTLE = 0.002
#: The broker's bound on an open transaction (librdkafka's default, said explicitly).
TRANSACTION_TIMEOUT_MS = 60_000
#: Errors that mean a newer server holds the ``transactional.id``.
FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED}


class Fenced(Exception):
    """One of this server's transactional producers can go on no more (a newer server took the
    cluster's ``transactional.id`` it carries, or it failed for good): the server must stop granting,
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
    """The server's two transactional producers, in turns: changelog records and dispatch
    messages."""

    def __init__(self, config: Config) -> None:
        self.config = config
        #: Called (from the committing thread) when a commit is done: it ends the loop's wait.
        self.wake: Callable[[], None] = lambda: None
        self.topic = config.topic("changelog")
        #: The two ``transactional.id`` taken in turns (see :data:`TURNS`).
        self.transactional_ids = [config.topic("server") + suffix for suffix in TURNS]
        clients = ["server" + suffix.replace(".", "-") for suffix in TURNS]  # server, server-2
        self.monitors = [transport.ConnectionMonitor(f"{client} transactional producer") for client in clients]
        self.producers = [self._make(config, client, tid, monitor)
                          for client, tid, monitor in zip(clients, self.transactional_ids, self.monitors)]
        #: Which of :attr:`producers` carries the next transaction. A term (a new Changelog)
        #: begins on the id :meth:`start` took first: a server that took only the second one
        #: (two servers taking over at once, the first frozen between its two) is fenced at its
        #: first commit, before it can commit anything the other's read of the end lacks.
        self.turn = 0
        #: When the producer not in turn was last polled (:meth:`_serve_other`); monotonic.
        self._served = 0.0
        self._opened = 0.0
        #: Messages for the next transaction; those of the transaction being committed.
        self.queued: list[Outgoing] = []
        self.sending: list[Outgoing] = []
        self._notes: list[tuple[int]] = []
        self._positions: dict[int, int] = {}
        #: "idle", "primed" (a transaction open ahead of need, holding placeholders only),
        #: "committing" (a commit under way, or timed out: call it again) or "aborting" (an
        #: abort that timed out: likewise).
        self.state = "idle"
        #: The call committing the transaction, in the committing thread, while it runs.
        self._committer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="yadtq-commit")
        self._call: concurrent.futures.Future[KafkaError | None] | None = None
        #: librdkafka refused to abort the open transaction after :data:`OPEN_LIMIT` (its
        #: commit call had not ended): its commit goes on instead.
        self._abort_refused = False
        #: When the rows waiting for a transaction were first put off (:data:`LINGER`), and
        #: when the last transaction ended (:data:`SETTLE`); monotonic.
        self._put_off: float | None = None
        self._ended = 0.0
        self.undelivered = 0
        self.commits = 0
        self.problem = ""

    @staticmethod
    def _make(config: Config, client: str, transactional_id: str,
              monitor: transport.ConnectionMonitor) -> Producer:
        settings = transport.producer_settings(config, client, monitor)
        settings["transactional.id"] = transactional_id
        settings["message.max.bytes"] = max(int(str(settings.get("message.max.bytes", 0))),
                                            changelog.record_bytes(config))
        settings["linger.ms"] = 0  # a commit sends the batch anyway: never wait for more
        settings.setdefault("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS)
        return Producer(settings)

    @property
    def producer(self) -> Producer:
        """The producer whose turn it is: it carries the open transaction, or the next one."""
        return self.producers[self.turn]

    def _serve_other(self) -> None:
        """Once a second, poll the producer not in turn: while commits stay on the other one (the
        broker away), nothing else serves it, and librdkafka keeps a statistics event a second
        on it until it is (issue 14). It has nothing in flight: its last transaction ended."""
        now = time.monotonic()
        if now - self._served >= 1.0:
            self._served = now
            self.producers[(self.turn + 1) % len(self.producers)].poll(0)

    def _next_turn(self) -> None:
        """A transaction ended (committed or aborted): the other producer carries the next one,
        while the coordinator writes this one's markers."""
        self.turn = (self.turn + 1) % len(self.producers)

    # ------------------------------------------------------------ start

    def start(self, timeout: float = 60.0) -> None:
        """Take both ``transactional.id``: any older server's producers are fenced, and their
        open transactions aborted, before this one reads the changelog's end."""
        deadline = time.monotonic() + timeout
        for producer, transactional_id in zip(self.producers, self.transactional_ids):
            while True:
                try:
                    producer.init_transactions(max(1.0, deadline - time.monotonic()))
                    break
                except KafkaException as exc:
                    err = exc.args[0]
                    if not err.retriable() or time.monotonic() >= deadline:
                        raise UnreachableError(f"cannot take transactional.id {transactional_id}:"
                                               f" {err.str()}") from None

    def restore(self, store: Store, timeout: float = 3600.0, tick: Callable[[], None] = lambda: None) -> int:
        """Bring the store to the changelog's end (:func:`~yadtqd.server.restore.restore`)."""
        return restore(self.config, store, timeout, tick)

    # ------------------------------------------------------------ each turn

    def send(self, topic: str, value: bytes, key: str, partition: int) -> None:
        """A dispatch message for the next transaction."""
        self.queued.append(Outgoing(topic, value, key, partition))

    def commit(self, store: Store, timeout: float = COMMIT_WAIT, linger: bool = True) -> bool:
        """Send the rows the store noted and the queued messages in one transaction and commit
        it, waiting at most ``timeout`` for the commit (0: the loop goes on while it is done);
        first, the transaction being committed, if any, must be done. True once all is
        committed (or when there was nothing to send, or only rows that may still wait:
        :data:`LINGER`, unless not ``linger``), False while a commit is under way or must be
        tried again (the next call sees to both). Raises :class:`Fenced`."""
        self._serve_other()
        if self.state == "aborting" and not self._abort(timeout):
            return False
        if self.state == "committing" and not self._commit(store, timeout):
            return False
        tables, notes = store.pending_rows(CHUNK)
        backlog = len(notes) >= CHUNK  # more noted than one transaction carries
        if backlog:  # notes grow with changes while Kafka refuses them
            noted = store.compact_notes(NOTES_LIMIT)
            if noted is not None:
                log.warning("%d changes waited for %s: kept only the newest of each row",
                            noted, self.topic, extra={"event": "changelog_backlog"})
        if not tables and not self.queued:
            if self.state == "primed" and time.monotonic() - self._opened >= PRIME_LIMIT:
                self.state = "committing"  # placeholders only: end it before the broker would
                return self._commit(store, timeout)
            return True
        if linger and not self.queued and not backlog:
            now = time.monotonic()
            self._put_off = self._put_off or now
            if now - self._put_off < LINGER:
                return True
        self._put_off = None
        self._notes, self._positions = notes, {}
        # the messages go with the last chunk of a backlog, which holds every note left: a
        # chunk holds the oldest notes, and a run must not reach a worker before the record of
        # its grant is committed (DESIGN 13: a crash between two chunks would grant it again)
        self.sending, self.queued = ([], self.queued) if backlog else (self.queued, [])
        if self.state != "primed" and not self._begin():
            return False
        self.state = "committing"
        records = [record for changes in tables for record in changelog.encode_rows(changes)]
        last = len(records) - 1
        for index, (key, value) in enumerate(records):
            # one delivery report read, the last record's: the records go to one partition in
            # order, so its offset is the highest (a report a record costs the committing
            # thread 2 to 3 µs of the interpreter, three records a task)
            problem = self._produce(self.topic, value, key, 0,
                                    self._delivered if index == last else None)
            if problem:  # the start checks sizes, so this is not expected: never confirm it
                log.critical("row %s cannot be written to %s: %s; the transaction is aborted",
                             key.decode(errors="replace"), self.topic, problem,
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

    def prime(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Open the next transaction now, ahead of need, with a placeholder on the changelog
        and on each of ``partitions``: the broker registers them while the loop waits for
        work, and the turn that has some only produces and commits. (Registering is a round
        trip to the transaction coordinator, which also answers "not yet" for a while after a
        commit; librdkafka then waits 20 ms.) Placeholders are skipped by every reader; an
        open transaction hides nothing, since this server's two producers alone write these
        partitions, one transaction at a time."""
        if (self.state != "idle" or self.queued or time.monotonic() - self._ended < SETTLE
                or not self._begin()):
            return
        self.state, self.sending, self._notes = "primed", [], []
        placeholder = m.encode(m.Prime())
        problems = [self._produce(self.topic, None, changelog.PRIME, 0)]
        problems += [self._produce(topic, placeholder, b"", partition) for topic, partition in partitions]
        problem = next((p for p in problems if p), None)
        if problem:  # not expected (the partitions exist): abort, and wait a second to try again
            log.info("could not open the next transaction ahead of need: %s", problem)
            self.state = "aborting"
            if self._abort(COMMIT_WAIT):
                self._ended = time.monotonic() + 1.0

    def wake_in(self) -> float | None:
        """Seconds until this producer has something to do with no input: commit rows put
        off, open a transaction ahead of need, end one that waited too long."""
        now = time.monotonic()
        waits = []
        if self._put_off is not None:  # (their commit also ends a transaction kept too long)
            waits.append(self._put_off + LINGER - now)
        elif self.state == "primed":
            waits.append(self._opened + PRIME_LIMIT - now)
        if self.state == "idle" and now - self._ended < SETTLE:
            waits.append(self._ended + SETTLE - now)
        return max(0.0, min(waits)) if waits else None

    def discard(self) -> None:
        """Drop what this producer holds (a term that ends): nothing left in flight, so
        nothing keeps it alive (a fenced producer may refuse even that); the committing thread
        ends once its call does."""
        self._committer.shutdown(wait=False)
        for producer in self.producers:
            with contextlib.suppress(KafkaException):
                producer.purge()
                producer.flush(0)

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
            if self.state == "primed" and not self.queued and not store.has_pending():
                self.state = "committing"  # placeholders only: committed, a standby reads past them
                if not self._commit(store, min(COMMIT_WAIT, max(0.1, deadline - time.monotonic()))):
                    log.info("the last transaction, placeholders only, was left to the broker")
                return
            if (self.commit(store, min(COMMIT_WAIT * 3, max(0.1, deadline - time.monotonic())), linger=False)
                    and self.state == "idle" and not self.queued and not store.has_pending()):
                return
        log.error("the last changes did not reach %s before shutdown: the next start rebuilds"
                  " the database from the changelog", self.topic)

    def _begin(self) -> bool:
        """Begin a transaction; False (and what was being sent queued again) if the producer
        cannot now."""
        try:
            self.producer.begin_transaction()
        except KafkaException as exc:
            self.queued, self.sending = self.sending + self.queued, []
            if exc.args[0].fatal():
                self._failed(exc.args[0], timeout=1.0)
            return False
        self._opened, self._abort_refused = time.monotonic(), False
        return True

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
        """Commit the open transaction in the committing thread, unless it is under way, and
        wait at most ``timeout`` for it; True once committed (its notes confirmed)."""
        if self._call is None:
            if time.monotonic() - self._opened > OPEN_LIMIT and not self._abort_refused:
                log.error("a changelog transaction stayed uncommitted for %.0f s: aborting it, to"
                          " send it again", OPEN_LIMIT, extra={"event": "changelog_abort"})
                self.state = "aborting"
                self._abort(max(timeout, COMMIT_WAIT))
                return False
            self._call = self._committer.submit(self._committed, self.producer)
            self._call.add_done_callback(lambda _: self.wake())
        try:
            error = self._call.result(timeout)
        except concurrent.futures.TimeoutError:
            return False  # under way: a later call sees it done
        except BaseException:  # not expected (a callback that raised, say): the loop stops
            self._call = None
            raise
        self._call = None
        if error is not None:
            return self._failed(error, max(timeout, COMMIT_WAIT))
        self.state, self._ended = "idle", time.monotonic()
        self._next_turn()
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

    @staticmethod
    def _committed(producer: Producer) -> KafkaError | None:
        """The commit itself, in the committing thread: None once done, else why not."""
        try:
            producer.commit_transaction(COMMIT_WAIT)
        except KafkaException as exc:
            return exc.args[0]  # type: ignore[no-any-return]
        return None

    def _failed(self, err: KafkaError, timeout: float) -> bool:
        if err.fatal() and err.code() in FENCED:
            raise Fenced(f"this server's transactional producer was fenced ({err.str()}): another"
                         f" server took transactional.id {self.transactional_ids[self.turn]}, or the broker"
                         " ended a transaction left open past its timeout; this one stops granting")
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
            if exc.args[0].code() == KafkaError._CONFLICT:  # a commit call is open, and librdkafka
                # aborts nothing before it ends: it is called again (it ends within the
                # transaction's timeout, committed, or failed and then aborted)
                self.state, self._abort_refused = "committing", True
                log.warning("the changelog transaction cannot be aborted while its commit is under"
                            " way: its commit goes on", extra={"event": "changelog_slow"})
            return False
        self.undelivered += sum(1 for out in self.sending if not out.retried)
        self.queued = [dataclasses.replace(out, retried=True) for out in self.sending] + self.queued
        self.sending, self.state, self._ended = [], "idle", time.monotonic()
        self._next_turn()
        return True
