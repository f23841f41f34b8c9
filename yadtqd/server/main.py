"""The server role: read ``tasks`` and ``events``, keep the store, grant, detect deaths, serve.

The main loop, in order: take what the inboxes' threads read from Kafka, every event first
(:mod:`yadtqd.server.reading`) → in one SQLite
transaction, apply it and its offsets (:mod:`yadtqd.server.ingest`), declare dead the epochs
proven silent (:mod:`yadtqd.server.evidence`) and grant queued tasks
(:mod:`yadtqd.server.scheduler`) → produce the ``run``, ``fenced`` and answer messages and the
markers (:mod:`yadtqd.server.dispatch`), and send again what failed to deliver. Runs are
produced only after the grants are committed; after a restart, grants not yet started are sent
again (workers drop duplicates by invariant 5). A task submitted on the socket is recorded by
the socket's thread, which wakes the loop to grant it at once rather than when its copy comes
back from ``tasks``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from yadtqd import messages as m
from yadtqd import openfiles, topics, transport
from yadtqd.config import Config
from yadtqd.errors import UnreachableError
from yadtqd.server.dispatch import Dispatcher
from yadtqd.server.evidence import Evidence
from yadtqd.server.ingest import Effects, Fence, Ingest
from yadtqd.server.queries import Changes, Queries, Submitter
from yadtqd.server.reading import Reading
from yadtqd.server.election import Elector
from yadtqd.server.replication import Changelog, Fenced
from yadtqd.server.standby import Follower
from yadtqd.server.cron import Cron
from yadtqd.server.limiter import Limiter
from yadtqd.server.lock import hold_database
from yadtqd.server.retention import Retention
from yadtqd.server.scheduler import Scheduler
from yadtqd.server.sockets import SocketServer
from yadtqd.store import Store
from yadtqd.systemd import Notifier

log = logging.getLogger("yadtqd.server")

#: Seconds between two looks for tasks that waited too long for a worker providing their name.
UNROUTABLE_EVERY = 5.0


class Server:
    """One server process."""

    def __init__(self, config: Config, notifier: Notifier) -> None:
        self.config = config
        self.notifier = notifier
        self.stopping = False
        self.scheduler = Scheduler(Limiter(self.config.limits))
        self.changes = Changes()
        self.events_topic = config.topic("events")
        self.counts: dict[str, int] = {}
        self.nonce = uuid.uuid4().hex
        self.evidence = Evidence(self.nonce, config.server.heartbeat_timeout, time.monotonic())
        self.topic_health: list[topics.TopicHealth] = []
        self.unproven: set[int] = set()
        self.last_unroutable = 0.0
        self.retention = Retention(config)
        self.cron = Cron(config.schedules)
        #: Task name → since when (monotonic) this process has seen it queued and unprovided.
        self.unprovided: dict[str, float] = {}
        #: Producers this loop does not poll otherwise (the socket's submits, served on their own
        #: threads, may be rare): polled once a second, for librdkafka queues a statistics event
        #: (some KiB) each second on every client, and keeps it until the client is polled:
        #: RSS grew about 7 KiB a second before (issue 14).
        self.idle_clients: list[Producer] = []
        self.last_status = 0.0
        self.last_watchdog = 0.0
        self.reading: Reading | None = None
        #: Fenced (monotonic time until which to stand by even if the group still says we
        #: lead: it may not have told us of the newer active yet).
        self.deposed_until = 0.0
        self.last_unreachable = float("-inf")
        #: This server's role, as the socket's ``stats`` shows it.
        self.name = config.server.server_name
        self.role: dict[str, object] = {"role": "standby", "name": self.name, "lag": -1,
                                        "lag_seconds": None, "standbys": []}
        self.term = 0
        self.stop_signal = ""
        self.elector: Elector | None = None
        #: Metadata and offsets beside the consumers' parked fetches (set by :meth:`run`).
        self.admin: AdminClient

    def run(self) -> int:
        """Serve until SIGTERM, as the active server or a standby (DESIGN 13), changing role
        as the servers' group decides; returns the exit status."""
        openfiles.ensure(openfiles.server_needs(self.config.server.max_connections),
                         f"[server] max_connections = {self.config.server.max_connections}")
        lock = hold_database(self.config.server.database)
        store = Store(self.config.server.database, create=True)
        admin = self.admin = transport.make_admin(self.config)
        specs = topics.topic_specs(self.config)
        topics.ensure_topics(admin, specs)
        topics.check_message_sizes(admin, self.config)
        topics.keep_leader_short(admin, self.config)
        self.topic_health = topics.health(admin, [s.name for s in specs])
        socket_producer, _ = transport.make_producer(self.config, "server-socket", linger_ms=0)
        self.idle_clients.append(socket_producer)
        submitter = Submitter(self.config.server.database, socket_producer, self.config.topic("tasks"),
                              on_recorded=self._wake)
        queries = Queries(submitter, self.changes, self.config.server.max_task_bytes,
                          [h.view() for h in self.topic_health], self.role, self.config.schedules,
                          self.config.limits)
        sockets = SocketServer(self.config.server.socket, queries, self.config.server.database,
                               self.config.server.max_request_bytes,
                               self.config.server.max_connections, self.config.server.idle_timeout,
                               self.config.server.socket_group)
        sockets.start()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, self._on_sigterm)
        elector = Elector(self.config)
        elector.start()
        self.elector = elector
        self.notifier.ready(self._status(store))
        log.info("server ready: socket %s, database %s", self.config.server.socket,
                 self.config.server.database)
        try:
            while not self.stopping:
                if self._may_lead(elector):
                    self._active(store, elector, submitter)
                else:
                    self._standby(store, elector)
        finally:
            self.notifier.stopping()
            sockets.close()
            elector.close()  # after the last commit: a standby takes over at once
            transport.flush(socket_producer, 10)
            store.close()
            os.close(lock)
        log.info("server stopped")
        return 0

    def _wake(self) -> None:
        if self.reading is not None:
            self.reading.wake()

    # ------------------------------------------------------------ roles

    def _standby(self, store: Store, elector: Elector) -> None:
        """Keep the replica: apply the changelog as it comes, until elected or stopped. The
        broker away (at start, or after an outage cost us the active role) is waited out."""
        self.role.update(role="standby", lag=-1, lag_seconds=None, standbys=[])
        follower: Follower | None = None
        try:
            while not self.stopping and not self._may_lead(elector):
                if follower is None:
                    follower = self._follower(store)
                    if follower is None:
                        self._report(store)
                        elector.changed.wait(1.0)  # the broker away: try again, or get elected
                        elector.changed.clear()
                        continue
                if follower.monitor.orphaned:  # it knows no broker: a new one connects again
                    follower.close()
                    follower = None
                    continue
                if follower.step(0.2):
                    self.changes.signal()
                lag = follower.lag()
                self.role.update(lag=lag, lag_seconds=follower.lag_seconds(lag))
                self._report(store)
        finally:
            if follower is not None:
                follower.close()

    def _follower(self, store: Store) -> Follower | None:
        try:
            follower = Follower(self.config, store, self.admin, timeout=5.0)
        except UnreachableError as exc:
            self._unreachable(f"cannot follow {self.config.topic('changelog')} yet: {exc}")
            return None
        log.info("standby: following %s", self.config.topic("changelog"), extra={"event": "standby"})
        return follower

    def _unreachable(self, problem: str) -> None:
        """Say so once per episode (every minute at most) while the broker stays away."""
        mono = time.monotonic()
        if mono - self.last_unreachable >= 60.0:
            self.last_unreachable = mono
            log.warning("%s (the broker away?); trying again", problem, extra={"event": "unreachable"})

    def _active(self, store: Store, elector: Elector, submitter: Submitter) -> None:
        """Take over (fence the old active, read the changelog to its end) and serve as the
        active until stopped, deposed or fenced; then the next role starts from the store. A
        takeover the broker cannot complete now is tried again."""
        started = time.monotonic()
        self._reset()
        out = Changelog(self.config)
        phases = [started]
        try:
            out.start(timeout=10.0)  # an older active is fenced before the changelog's end is read
            phases.append(time.monotonic())
            out.restore(store, tick=lambda: self._report(store))
            phases.append(time.monotonic())
            store.capture()  # before the reading's offsets, which may count lost ones
            reading = Reading(self.config, store, self.admin, timeout=5.0)
            phases.append(time.monotonic())
        except UnreachableError as exc:
            store.stop_capture()
            out.discard()
            self._unreachable(f"cannot take over yet: {exc}")
            self._report(store)
            elector.changed.wait(1.0)
            elector.changed.clear()
            return
        self.counts = dict(reading.counts)
        self.evidence.watch(range(self.counts[self.events_topic]))
        dispatcher = Dispatcher(self.config, self.counts[self.config.topic("dispatch")], self.evidence, out)
        ingest = Ingest(store, self.scheduler, self.config, self.evidence, dispatcher.partitions)
        self._restore(store, dispatcher)
        took = round(time.monotonic() - started, 3)
        with store.transaction():  # in the first turn's Kafka transaction
            self.term = store.begin_term(self.name, socket.gethostname(), os.getpid(), time.time(), took,
                                         "ended without stepping down (killed, frozen or cut off from"
                                         " the broker)")
        self.reading = reading
        out.wake = reading.wake  # a commit done in its thread ends the loop's wait
        signal.set_wakeup_fd(reading.wakeup_fd, warn_on_full_buffer=False)
        reading.start()
        with submitter.lock:
            submitter.recording = True
        self.role.update(role="active", lag=0, lag_seconds=0.0, standbys=[])
        log.warning("active: took over in %.1f s (term %d; fencing %.2f s, changelog %.2f s, offsets"
                    " %.2f s)", took, self.term, *(b - a for a, b in zip(phases, phases[1:])),
                    extra={"event": "takeover"})
        fenced = False
        try:
            # a client that knows no broker never connects again: the next term makes new ones
            clients = (*reading.monitors, *out.monitors, dispatcher.monitor)
            while not self.stopping and elector.leading.is_set() and not any(c.orphaned for c in clients):
                self._turn(store, ingest, reading, dispatcher, out)
            why = elector.why if not elector.leading.is_set() else next(
                (f"the {c.client} knew no broker" for c in clients if c.orphaned), "")
            with store.transaction():  # said in the last transaction, if Kafka takes it
                store.end_term(self.term, time.time(), f"stopped ({self.stop_signal})" if self.stopping
                               else f"stepped down: {why}")
        except Fenced as exc:
            fenced = True  # not active again before the group has had time to say otherwise
            self.deposed_until = time.monotonic() + 2 * self.config.server.session_timeout
            log.error("stepping down: %s", exc, extra={"event": "fenced"})
        finally:
            with submitter.lock:
                submitter.recording = False
            signal.set_wakeup_fd(-1)
            self.reading = None
            reading.stop()
            if not fenced:  # what is left, if Kafka takes it: fewer rebuilds after a step-down
                try:
                    out.close(store, 10.0 if self.stopping else 3.0)
                except Fenced:
                    pass
                except Exception:  # the rest of this cleanup still runs; the next start rebuilds
                    log.exception("the last changes could not be committed at the stop",
                                  extra={"event": "changelog_close_failed"})
            out.discard()
            dispatcher.flush(2)
            dispatcher.discard()
            reading.close()
            store.stop_capture()
        if not self.stopping:
            log.warning("stepped down to standby", extra={"event": "step_down"})

    def _may_lead(self, elector: Elector) -> bool:
        """Whether to be the active now: elected, and not just fenced by a newer active the
        group has not told us of yet."""
        if not elector.leading.is_set():
            self.deposed_until = 0.0  # the group caught up: its next choice stands
            return False
        return time.monotonic() >= self.deposed_until

    def _reset(self) -> None:
        """What an active keeps in memory starts afresh with each term."""
        self.scheduler = Scheduler(Limiter(self.config.limits))
        self.counts = {}
        self.nonce = uuid.uuid4().hex
        self.evidence = Evidence(self.nonce, self.config.server.heartbeat_timeout, time.monotonic())
        self.unproven = set()
        self.unprovided = {}
        self.last_unroutable = 0.0
        self.retention = Retention(self.config)
        self.cron = Cron(self.config.schedules)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.stopping = True  # the main loop acts on it
        self.stop_signal = signal.Signals(signum).name

    def _restore(self, store: Store, dispatcher: Dispatcher) -> None:
        """Rebuild the scheduler's view; re-send grants not known to have started."""
        live = store.live_workers()
        self.scheduler.load(live, store.held(), self.counts[self.events_topic], dispatcher.partitions)
        pending = store.pending_grants()
        routes = self.scheduler.routes()
        dispatcher.runs(pending, routes)  # in the first turn's transaction
        for row in store.cancelling():  # cancels the workers may not have been told of
            dispatcher.cancel(row["worker"], row["epoch"], routes.get(row["epoch"], -1), row["id"],
                              row["attempt"], row["grant_no"] or None)
        if live or pending:
            log.info("restored %d live workers; re-sent %d grants not yet started",
                     len(live), len(pending))

    # ------------------------------------------------------------ the loop

    def _turn(self, store: Store, ingest: Ingest, reading: Reading, dispatcher: Dispatcher,
              out: Changelog) -> None:
        reading.wait(self._idle(store, out))
        if not reading.alive:
            raise UnreachableError("a thread reading Kafka died (see the log above); stopping")
        batch = reading.take()
        now, mono = time.time(), time.monotonic()  # one instant: grants' times and limits' clock
        if self.retention.step(store, now) + self.cron.step(store, now):
            self.changes.signal()
        with store.transaction():  # one commit for the batch, the deaths and the grants
            effects = ingest.apply(batch, now) if batch else Effects()
            fences = effects.fences + self._check_deaths(ingest, now)
            promoted = store.promote_due(now)  # scheduled tasks now due join the queue
            grants = self.scheduler.plan(store, now, mono)
        if batch or grants or fences or promoted:
            self.changes.signal()  # results and grants are readable now
        self._fail_unroutable(store, now)
        dispatcher.runs(grants, self.scheduler.routes())
        for fence in fences:
            dispatcher.fence(fence.worker, fence.epoch, fence.partition, fence.reason)
        for cancel in effects.cancels:
            dispatcher.cancel(cancel.worker, cancel.epoch, cancel.partition, cancel.task_id,
                              cancel.attempt, cancel.grant)
        for answer in effects.answers:
            dispatcher.answer(answer.worker, answer.partition, answer.message())
        # The turn's changes and messages, one Kafka transaction, committed while the next
        # turns go on (their work waits for the transaction after it).
        if out.commit(store, timeout=0.0):
            dispatcher.prime(self.scheduler.open_routes())  # the next one, ahead of need
        self._follow(reading)
        dispatcher.poll()  # delivery reports first: a slow turn is not a slow broker
        mono = time.monotonic()
        for partition in self.evidence.due(mono):
            dispatcher.mark(partition, self.nonce, mono)
        self._count_undelivered(store, out)
        self._warn_unproven(dispatcher, mono)
        self._report(store)

    def _idle(self, store: Store, out: Changelog) -> float:
        """How long the loop may wait for Kafka: a tenth of a second, or until the next
        scheduled task is due (it is then granted on time) or the changelog's producer has
        work of its own, if sooner."""
        due = store.next_due()
        wait = 0.1 if due is None else min(0.1, max(0.0, due - time.time()))
        own = out.wake_in()
        return wait if own is None else min(wait, own)

    def _check_deaths(self, ingest: Ingest, now: float) -> list[Fence]:
        """Declare dead the epochs *proven* silent for ``heartbeat_timeout``: a marker sent that
        long after their last heartbeat (and after their partition's last trouble) was read back
        from their ``events`` partition. The server's own lag, a frozen broker or a partition
        without a leader is never taken for a death (DESIGN section 6). Call inside the turn's
        transaction."""
        timeout = self.config.server.heartbeat_timeout
        fences = []
        for member in list(self.scheduler.members.values()):
            silence = self.evidence.silence(member.partition, member.last_heartbeat)
            if silence <= timeout:
                continue
            reason = f"no heartbeat for {silence:.1f} s"
            ingest.declare_dead(member.epoch, reason, now)
            fences.append(Fence(member.worker, member.epoch, reason, member.dispatch))
        return fences

    def _fail_unroutable(self, store: Store, now: float) -> None:
        """Every few seconds: fail the queued tasks of names no live worker has provided for
        ``unroutable_timeout`` (counted by this process from when it saw the name unprovided, so
        a worker restart or a server restart never fails a backlog), so every task still ends."""
        timeout = self.config.server.unroutable_timeout
        mono = time.monotonic()
        if not timeout or mono - self.last_unroutable < UNROUTABLE_EVERY:
            return
        self.last_unroutable = mono
        provided = self.scheduler.provided()
        names = [n for n in store.queued_names() if n not in provided]
        self.unprovided = {n: self.unprovided.get(n, mono) for n in names}
        failed = []
        with store.transaction():
            for name, since in self.unprovided.items():
                if mono - since >= timeout:
                    failed += store.fail_unroutable(name, now - timeout, mono - since, now)
        for task_id in failed:
            log.warning("task %s failed: no live worker provided its task for %g s", task_id,
                        timeout, extra={"task_id": task_id, "event": "task_failed"})
        if failed:
            self.changes.signal()

    def _follow(self, reading: Reading) -> None:
        """Follow partitions added to ``events``: markers for them too. (Growth of ``dispatch``
        needs nothing: each epoch says which partition it reads, and keeps reading it.)"""
        events = reading.events_partitions
        if events > self.counts[self.events_topic]:
            self.counts[self.events_topic] = events
            self.evidence.watch(range(events))

    def _warn_unproven(self, dispatcher: Dispatcher, mono: float) -> None:
        """Say so (once per episode) when an events partition goes unproven for three timeouts:
        meanwhile no worker writing to it can be declared dead."""
        limit = 3 * self.config.server.heartbeat_timeout
        unproven = dict(self.evidence.unproven(mono, limit))
        for partition, seconds in unproven.items():
            if partition not in self.unproven:
                log.warning("%s[%d]: no marker read back for %.0f s, so no worker writing to it can"
                            " be declared dead (the broker is away, or the server may not write to"
                            " the topic; last problem: %s)", self.events_topic, partition, seconds,
                            dispatcher.marker_problem or "none", extra={"event": "unproven"})
        for partition in self.unproven - unproven.keys():
            log.info("%s[%d]: markers read back again", self.events_topic, partition)
        self.unproven = set(unproven)

    def _count_undelivered(self, store: Store, out: Changelog) -> None:
        failed = out.take_undelivered()
        if failed:
            with store.transaction():
                store.bump("undelivered", failed)

    # ------------------------------------------------------------ reporting

    def _report(self, store: Store) -> None:
        mono = time.monotonic()
        watchdog = self.notifier.watchdog_interval()
        if watchdog and mono - self.last_watchdog >= watchdog:
            self.last_watchdog = mono
            self.notifier.watchdog()
        if mono - self.last_status >= 1.0:
            self.last_status = mono
            for client in self.idle_clients:  # see idle_clients
                client.poll(0)
            self.notifier.status(self._status(store))
            self._servers()

    def _servers(self) -> None:
        """Once a second: the active notes the standbys heard from; a standby reports its lag
        on ``leader`` for the active to show."""
        if self.elector is None:
            return
        if self.role["role"] == "active":
            self.role["standbys"] = self.elector.standbys()
            return
        lag, seconds = self.role["lag"], self.role["lag_seconds"]
        report = m.StandbyReport(server=self.name, host=socket.gethostname(), pid=os.getpid(),
                                 ts=time.time(), lag=lag if isinstance(lag, int) else -1,
                                 lag_seconds=seconds if isinstance(seconds, float) else None)
        self.elector.report(report)

    def _status(self, store: Store) -> str:
        if self.role["role"] != "active":
            return f"standby, lag {self.role['lag']}"
        counts = store.counts()
        live = sum(1 for mb in self.scheduler.members.values() if mb.accepting)
        running = counts.get("assigned", 0) + counts.get("processing", 0)
        return f"active, workers {live}, queued {counts.get('queued', 0)}, running {running}"

