"""The server role: read ``tasks`` and ``events``, keep the store, grant, detect deaths, serve.

The main loop, in order: take what the inbox thread read from Kafka → apply it and its offsets
in one transaction (:mod:`yadtqd.server.ingest`) → declare dead the epochs whose heartbeats
stopped → grant queued tasks in one transaction (:mod:`yadtqd.server.scheduler`) → produce the
``run`` and ``fenced`` messages (:mod:`yadtqd.server.dispatch`). Runs are produced only after
the grants are committed; after a restart, grants not yet started are sent again (workers drop
duplicates by invariant 5). A task submitted on the socket is recorded by the socket's thread,
which wakes the loop to grant it at once rather than when its copy comes back from ``tasks``.
"""

from __future__ import annotations

import logging
import select
import signal
import time

from confluent_kafka import Consumer

from yadtqd import transport
from yadtqd.config import Config
from yadtqd.inbox import Inbox
from yadtqd.server.dispatch import Dispatcher
from yadtqd.server.ingest import Fence, Ingest
from yadtqd.server.queries import Changes, Queries, Submitter
from yadtqd.server.scheduler import Scheduler
from yadtqd.server.sockets import SocketServer
from yadtqd.store import Store
from yadtqd.systemd import Notifier

log = logging.getLogger("yadtqd.server")


class Server:
    """One server process."""

    def __init__(self, config: Config, notifier: Notifier) -> None:
        self.config = config
        self.notifier = notifier
        self.stopping = False
        self.scheduler = Scheduler()
        self.changes = Changes()
        self.events_topic = config.topic("events")
        self.dispatch_partitions = 1
        self.events_partitions = 1
        self.positions: dict[tuple[str, int], int] = {}
        self.last_status = 0.0
        self.last_watchdog = 0.0

    def run(self) -> int:
        """Serve until SIGTERM; returns the exit status."""
        store = Store(self.config.server.database, create=True)
        admin = transport.make_admin(self.config)
        transport.ensure_topics(admin, transport.topic_specs(self.config))
        consumer, consumer_link = transport.make_consumer(self.config, "server")
        self._assign(consumer, store)
        dispatcher = Dispatcher(self.config, self.dispatch_partitions)
        inbox = Inbox(consumer, self.config.server.batch_size,
                      watch=[(self.events_topic, p) for p in range(self.events_partitions)])
        ingest = Ingest(store, self.scheduler, self.config, self.events_partitions)
        self._restore(store, dispatcher)
        socket_producer, _ = transport.make_producer(self.config, "server-socket", linger_ms=0)
        submitter = Submitter(self.config.server.database, socket_producer, self.config.topic("tasks"),
                              on_recorded=inbox.wake)
        sockets = SocketServer(self.config.server.socket, Queries(submitter, self.changes,
                               self.config.server.max_task_bytes), self.config.server.database,
                               self.config.server.max_request_bytes)
        sockets.start()
        signal.set_wakeup_fd(inbox.wakeup_fd, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, self._on_sigterm)
        inbox.start()
        self.notifier.ready(self._status(store))
        log.info("server ready: socket %s, database %s", self.config.server.socket,
                 self.config.server.database)
        try:
            while not self.stopping:
                self._turn(store, ingest, inbox, dispatcher, consumer_link)
        finally:
            self.notifier.stopping()
            sockets.close()
            inbox.stop()
            dispatcher.flush(10)
            transport.flush(socket_producer, 10)
            consumer.close()
            store.close()
        log.info("server stopped")
        return 0

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.stopping = True  # the main loop acts on it

    def _assign(self, consumer: Consumer, store: Store) -> None:
        """Read ``tasks`` and ``events`` from the offsets saved in the store (invariant 6)."""
        saved = store.offsets()
        positions: dict[tuple[str, int], int] = {}
        for topic in (self.config.topic("tasks"), self.events_topic):
            count = transport.partition_count(consumer, topic)
            for p in range(count):
                positions[(topic, p)] = saved.get((topic, p), 0)
        self.events_partitions = transport.partition_count(consumer, self.events_topic)
        self.dispatch_partitions = transport.partition_count(consumer, self.config.topic("dispatch"))
        transport.assign(consumer, positions)
        self.positions = positions

    def _restore(self, store: Store, dispatcher: Dispatcher) -> None:
        """Rebuild the scheduler's view; re-send grants not known to have started."""
        live = store.live_workers()
        partition_of = {r["worker"]: transport.partition_for(r["worker"], self.events_partitions)
                        for r in live}
        self.scheduler.load(live, store.held(), partition_of)
        pending = store.pending_grants()
        dispatcher.runs(pending)
        if live or pending:
            log.info("restored %d live workers; re-sent %d grants not yet started",
                     len(live), len(pending))

    # ------------------------------------------------------------ the loop

    def _turn(self, store: Store, ingest: Ingest, inbox: Inbox, dispatcher: Dispatcher,
              link: transport.ConnectionMonitor) -> None:
        select.select([inbox.reader], [], [], 0.1)
        batch = inbox.take()
        now = time.time()
        fences: list[Fence] = []
        if batch:
            with store.transaction():
                effects = ingest.apply(batch, now)
            self.changes.signal()  # results are readable now, before the next grants
            fences += effects.fences
            self.positions.update(effects.positions)
        fences += self._check_deaths(store, ingest, inbox, link, now)
        with store.transaction():
            grants = self.scheduler.plan(store, now)
        # a grant into a free slot starts on arrival: send it at once; one that waits in a
        # worker's prefetch anyway may wait for a batch
        urgent = {mb.epoch for g in grants if (mb := self.scheduler.members.get(g.epoch))
                  and mb.outstanding <= mb.slots}
        dispatcher.runs(grants, urgent)
        for fence in fences:
            dispatcher.fence(fence.worker, fence.epoch, fence.reason)
        dispatcher.poll()
        if grants or fences:
            self.changes.signal()
        self._report(store)

    def _check_deaths(self, store: Store, ingest: Ingest, inbox: Inbox,
                      link: transport.ConnectionMonitor, now: float) -> list[Fence]:
        """Declare dead the epochs silent for ``heartbeat_timeout`` — but only while the server
        has read their ``events`` partition to its end, so its own lag is never taken for a
        death, and only once its broker connection has been up for a ``heartbeat_timeout``
        (after a start or an outage, heartbeats held up in workers get time to arrive)."""
        mono = time.monotonic()
        timeout = self.config.server.heartbeat_timeout
        if not link.up or mono - link.changed_at < timeout:
            return []
        silent = [mb for mb in self.scheduler.members.values() if mono - mb.last_heartbeat > timeout]
        fences = []
        for member in silent:
            if not self._caught_up(inbox, member.partition):
                continue
            reason = f"no heartbeat for {mono - member.last_heartbeat:.1f} s"
            with store.transaction():
                ingest.declare_dead(member.epoch, reason, now)
            fences.append(Fence(member.worker, member.epoch, reason))
        return fences

    def _caught_up(self, inbox: Inbox, partition: int) -> bool:
        """True when every message in the partition (as of the last fetch) has been applied."""
        high = inbox.highs.get((self.events_topic, partition), -1)
        return high >= 0 and self.positions.get((self.events_topic, partition), 0) >= high

    # ------------------------------------------------------------ reporting

    def _report(self, store: Store) -> None:
        mono = time.monotonic()
        watchdog = self.notifier.watchdog_interval()
        if watchdog and mono - self.last_watchdog >= watchdog:
            self.last_watchdog = mono
            self.notifier.watchdog()
        if mono - self.last_status >= 1.0:
            self.last_status = mono
            self.notifier.status(self._status(store))

    def _status(self, store: Store) -> str:
        counts = store.counts()
        live = sum(1 for mb in self.scheduler.members.values() if mb.accepting)
        running = counts.get("assigned", 0) + counts.get("processing", 0)
        return f"workers {live}, queued {counts.get('queued', 0)}, running {running}"
