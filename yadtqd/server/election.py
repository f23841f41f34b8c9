"""Which server is active (DESIGN 13): Kafka's group coordinator decides, not us.

Every server joins the consumer group ``<prefix>.servers`` on the one-partition topic
``<prefix>.leader`` (it holds no messages); the member assigned that partition is the active.
``cooperative-sticky`` assignment keeps the partition where it is when a standby joins or
leaves, so a new standby never takes the role from a live active. A member that stops
heartbeating for ``[server] session_timeout`` seconds (killed, frozen, cut off) is removed by the
coordinator and the partition goes to a standby; a server that stops cleanly leaves the group
at once. The group only says who should be active: the new active's ``init_transactions``
fences the old one's producer, so a deposed active that has not noticed yet can change nothing.

A thread polls the group's consumer (heartbeats and rebalance callbacks are served there) and
sets :attr:`Elector.leading`; :attr:`Elector.changed` wakes whoever waits for a change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaException, TopicPartition

from yadtqd import transport
from yadtqd.config import Config

log = logging.getLogger("yadtqd.server")


class Elector:
    """This server's membership of the servers' group."""

    def __init__(self, config: Config, on_change: Callable[[], None] = lambda: None) -> None:
        self.topic = config.topic("leader")
        self.group = f"{config.topic_prefix}.servers"
        monitor = transport.ConnectionMonitor("server election consumer")
        settings = transport.consumer_settings(config, "server-election", monitor)
        session_ms = int(config.server.session_timeout * 1000)
        settings.update({"group.id": self.group, "partition.assignment.strategy": "cooperative-sticky",
                         "session.timeout.ms": session_ms,
                         "heartbeat.interval.ms": max(100, session_ms // 6)})
        self.consumer = Consumer(settings)
        self.on_change = on_change
        #: Set while this server holds the active role.
        self.leading = threading.Event()
        self.changed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="yadtq-election", daemon=True)

    def start(self) -> None:
        """Join the group."""
        self.consumer.subscribe([self.topic], on_assign=self._assigned, on_revoke=self._revoked,
                                on_lost=self._lost)
        self._thread.start()

    def close(self) -> None:
        """Leave the group at once (a standby takes over without waiting for the session
        timeout)."""
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
                    self.consumer.poll(0.1)  # serves heartbeats and rebalances; the topic is empty
                except KafkaException as exc:
                    log.warning("servers' group: %s", exc.args[0].str())
        except BaseException:
            log.exception("the servers' group thread failed")
            raise
        finally:
            if not self._stop.is_set():  # a member nobody polls must not be taken for active
                self._set(False, "the thread serving the servers' group ended")

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if any(tp.partition == 0 for tp in partitions):
            self._set(True, f"assigned {self.topic}[0] in group {self.group}")

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if any(tp.partition == 0 for tp in partitions):
            self._set(False, f"{self.topic}[0] revoked in group {self.group}")

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if any(tp.partition == 0 for tp in partitions):
            self._set(False, f"membership of group {self.group} lost (no contact within the"
                             " session timeout)")

    def _set(self, leading: bool, why: str) -> None:
        if leading == self.leading.is_set():
            return
        if leading:
            self.leading.set()
        else:
            self.leading.clear()
        log.warning("%s: %s", "elected active" if leading else "no longer active", why,
                    extra={"event": "elected" if leading else "deposed"})
        self.changed.set()
        self.on_change()
