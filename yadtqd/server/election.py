"""Which server is active (DESIGN 13): Kafka's group coordinator decides, not us.

Every server joins the consumer group ``<prefix>.servers`` on the one-partition topic
``<prefix>.leader``; the member assigned that partition is the active.
``cooperative-sticky`` assignment keeps the partition where it is when a standby joins or
leaves, so a new standby never takes the role from a live active. A member that stops
heartbeating for ``[server] session_timeout`` seconds (killed, frozen, cut off) is removed by the
coordinator and the partition goes to a standby; a server that stops cleanly leaves the group
at once. The group only says who should be active: the new active's ``init_transactions``
fences the old one's producer, so a deposed active that has not noticed yet can change nothing.

A thread polls the group's consumer (heartbeats and rebalance callbacks are served there) and
sets :attr:`Elector.leading`; :attr:`Elector.changed` wakes whoever waits for a change. Standbys
report their lag on the topic every second (:class:`~yadtqd.messages.StandbyReport`): the
active, the one member assigned its partition, reads them there (:meth:`Elector.standbys`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from yadtqd import messages as m
from yadtqd import transport
from yadtqd.config import Config
from yadtqd.errors import BadMessage

log = logging.getLogger("yadtqd.server")

#: Seconds a standby's report counts: one not renewed for that long is no longer shown.
REPORT_AGE = 5.0


class Elector:
    """This server's membership of the servers' group."""

    def __init__(self, config: Config, on_change: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.topic = config.topic("leader")
        self.group = f"{config.topic_prefix}.servers"
        self.consumer, self.monitor = self._group_consumer()
        self.reporter, self.reporter_monitor = self._report_producer()
        self.on_change = on_change
        self.name = config.server.server_name
        #: Set while this server holds the active role.
        self.leading = threading.Event()
        self.changed = threading.Event()
        #: Why the role last changed, as the group said it.
        self.why = ""
        self._reports: dict[str, tuple[m.StandbyReport, float]] = {}
        self._reports_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="yadtq-election", daemon=True)

    def start(self) -> None:
        """Join the group."""
        self._subscribe()
        self._thread.start()

    def _group_consumer(self) -> tuple[Consumer, transport.ConnectionMonitor]:
        monitor = transport.ConnectionMonitor("server election consumer")
        settings = transport.consumer_settings(self.config, "server-election", monitor)
        session_ms = int(self.config.server.session_timeout * 1000)
        settings.update({"group.id": self.group, "partition.assignment.strategy": "cooperative-sticky",
                         "session.timeout.ms": session_ms,
                         # a standby hears of a rebalance (the active left) at its next heartbeat
                         "heartbeat.interval.ms": max(100, min(250, session_ms // 6)),
                         # the reports are current state, not work: no offsets are committed,
                         # so each assignment reads from the topic's end
                         "auto.offset.reset": "latest"})
        return Consumer(settings), monitor

    def _report_producer(self) -> tuple[Producer, transport.ConnectionMonitor]:
        monitor = transport.ConnectionMonitor("server reports producer")
        settings = transport.producer_settings(self.config, "server-reports", monitor)
        settings.update({"linger.ms": 0, "message.timeout.ms": 5000})  # stale soon: never queue long
        return Producer(settings), monitor

    def _subscribe(self) -> None:
        self.consumer.subscribe([self.topic], on_assign=self._assigned, on_revoke=self._revoked,
                                on_lost=self._lost)

    def _replace_stuck(self) -> None:
        """Replace a client that will not connect again (see
        :meth:`~yadtqd.transport.ConnectionMonitor.stuck_beside`): a new group consumer joins
        the group, and this server is not the active until it is assigned the partition again.
        The old clients are closed in a thread of their own (the reports they held are stale)."""
        old: list[Consumer | Producer] = []
        why = self.monitor.stuck_beside(self.reporter_monitor)
        if why:
            log.error("the consumer of group %s %s: a new one joins", self.group, why,
                      extra={"event": "election_consumer_replaced"})
            self._set(False, f"the consumer of group {self.group} {why}: a new one joins")
            old.append(self.consumer)
            self.consumer, self.monitor = self._group_consumer()
            self._subscribe()
        if self.reporter_monitor.orphaned:
            old.append(self.reporter)
            self.reporter, self.reporter_monitor = self._report_producer()
        if old:
            transport.close_later(old, "yadtq-election-close")

    def report(self, report: m.StandbyReport) -> None:
        """Tell the active how far this standby is behind (once a second)."""
        transport.send(self.reporter, self.topic, m.encode(report), report.server)

    def close(self) -> None:
        """Leave the group at once (a standby takes over without waiting for the session
        timeout)."""
        with contextlib.suppress(KafkaException):
            self.reporter.purge()  # reports not sent by now are stale: none outlives us
            self.reporter.flush(0)
        self._stop.set()
        self._thread.join(10)
        try:
            self.consumer.close()
        except KafkaException as exc:
            log.warning("leaving the servers' group: %s", exc.args[0].str())
        self._set(False, "left the servers' group")

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    msg = self.consumer.poll(0.1)  # serves heartbeats and rebalances too
                    # the reports' delivery and librdkafka's statistics (queued each second
                    # on every client until served): the active never reports, so only here
                    self.reporter.poll(0)
                    if msg is not None:
                        self._read(msg)
                    self._replace_stuck()
                except KafkaException as exc:
                    log.warning("servers' group: %s", exc.args[0].str())
        except BaseException:
            log.exception("the servers' group thread failed")
            raise
        finally:
            if not self._stop.is_set():  # a member nobody polls must not be taken for active
                self._set(False, "the thread serving the servers' group ended")

    def standbys(self) -> list[dict[str, Any]]:
        """The standbys heard from in the last :data:`REPORT_AGE` seconds (what the active
        shows), by name."""
        mono = time.monotonic()
        with self._reports_lock:
            current = sorted(((r, mono - at) for r, at in self._reports.values()
                              if mono - at <= REPORT_AGE and r.server != self.name),
                             key=lambda item: item[0].server)
        return [{"server": r.server, "host": r.host, "pid": r.pid, "lag": r.lag,
                 "lag_seconds": r.lag_seconds, "heard": round(age, 1)} for r, age in current]

    def _read(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("reading %s: %s", self.topic, err.str())
            return
        try:
            report = m.parse_report(msg.value())
        except BadMessage as exc:
            log.warning("skipped a bad message at %s[%d]@%d: %s", self.topic, msg.partition() or 0,
                        msg.offset() or 0, exc, extra={"event": "bad_message"})
            return
        mono = time.monotonic()
        with self._reports_lock:
            self._reports[report.server] = (report, mono)
            for name, (_, at) in list(self._reports.items()):
                if mono - at > 10 * REPORT_AGE:  # a standby gone for good
                    del self._reports[name]

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if consumer is self.consumer and any(tp.partition == 0 for tp in partitions):
            self._set(True, f"assigned {self.topic}[0] in group {self.group}")

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if consumer is self.consumer and any(tp.partition == 0 for tp in partitions):
            self._set(False, f"{self.topic}[0] revoked in group {self.group}")

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if consumer is self.consumer and any(tp.partition == 0 for tp in partitions):
            self._set(False, f"membership of group {self.group} lost (no contact within the"
                             " session timeout)")

    def _set(self, leading: bool, why: str) -> None:
        if leading == self.leading.is_set():
            return
        self.why = why
        if leading:
            self.leading.set()
        else:
            self.leading.clear()
        log.warning("%s: %s", "elected active" if leading else "no longer active", why,
                    extra={"event": "elected" if leading else "deposed"})
        self.changed.set()
        self.on_change()
