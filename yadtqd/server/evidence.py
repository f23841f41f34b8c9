"""Evidence for death checks: markers the server writes to each ``events`` partition and reads
back (DESIGN section 6: a death is judged only on evidence).

Silence is not evidence. A frozen broker, a partition without a leader, a server that lags or
cannot fetch all make a worker look silent. So the server writes a :class:`~yadtqd.messages.Mark`
to every ``events`` partition every :attr:`Evidence.interval` seconds and notes when it sent it.
Reading a marker back proves two things: the partition is readable and advancing, and every
event appended before the marker has been applied. If a marker sent at ``S`` is read back and
the last heartbeat of an epoch on that partition was applied at ``H`` with ``S - H`` over the
timeout, then nothing of that epoch was appended to its partition for longer than the timeout:
that is a death.

A partition is *in trouble* while a marker's delivery failed or took longer than
:attr:`Evidence.slow` (a frozen broker, a leader election): silence is counted only from the
last trouble on, so the workers' own held-up heartbeats get a full timeout to arrive after the
partition recovers. All times are ``time.monotonic()`` of the server process.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Partition:
    """The markers of one ``events`` partition."""

    seq: int = 0
    #: seq → monotonic send time, for markers not yet acknowledged by the broker.
    unacked: dict[int, float] = field(default_factory=dict)
    #: seq → monotonic send time, for markers acknowledged but not yet read back.
    unread: dict[int, float] = field(default_factory=dict)
    last_sent: float = float("-inf")
    #: Send time of the newest marker read back (-inf while none).
    proven: float = float("-inf")
    #: The latest moment the partition was seen in trouble (start: the server's start).
    trouble: float = float("-inf")


class Evidence:
    """Markers per ``events`` partition: when each was sent, acknowledged and read back."""

    def __init__(self, nonce: str, timeout: float, started: float) -> None:
        self.nonce = nonce
        self.timeout = timeout
        #: Seconds between two markers of one partition.
        self.interval = timeout / 4
        #: A marker not acknowledged this long after it was sent means trouble.
        self.slow = timeout / 4
        self.started = started
        self.partitions: dict[int, Partition] = {}

    def watch(self, partitions: range) -> None:
        """Follow these partitions (more may be added when the topic grows)."""
        for p in partitions:
            self.partitions.setdefault(p, Partition(trouble=self.started))

    def due(self, mono: float) -> list[int]:
        """Partitions whose next marker should be sent now (one marker unacknowledged at a
        time per partition). Notes trouble on the partitions whose marker goes unacknowledged
        too long; call after serving the delivery reports, so a slow loop is not taken for it."""
        due = []
        for p, part in self.partitions.items():
            if any(mono - sent > self.slow for sent in part.unacked.values()):
                part.trouble = mono
            elif not part.unacked and mono - part.last_sent >= self.interval:
                due.append(p)
        return due

    def unproven(self, mono: float, limit: float) -> list[tuple[int, float]]:
        """Partitions without a marker read back for longer than ``limit`` seconds (and how
        long): no worker writing to them can be declared dead meanwhile."""
        out = []
        for p, part in self.partitions.items():
            since = max(part.proven, self.started)
            if mono - since > limit:
                out.append((p, mono - since))
        return out

    def sent(self, partition: int, mono: float) -> int:
        """A marker is being sent to ``partition``; returns its sequence number."""
        part = self.partitions[partition]
        part.seq += 1
        part.unacked[part.seq] = mono
        part.last_sent = mono
        return part.seq

    def acked(self, partition: int, seq: int, ok: bool, mono: float, latency: float | None = None) -> None:
        """The broker's delivery report for a marker; ``latency`` is librdkafka's measure from
        produce to acknowledgement (else the time since it was sent)."""
        part = self.partitions.get(partition)
        if part is None or seq not in part.unacked:
            return
        sent = part.unacked.pop(seq)
        took = latency if latency is not None else mono - sent
        if not ok or took > self.slow:
            part.trouble = mono
        else:
            part.unread[seq] = sent
        # a marker never read back must not be kept forever
        for old in [s for s in part.unread if s < seq - 64]:
            del part.unread[old]

    def read_back(self, partition: int, seq: int) -> None:
        """The server read one of its own markers back from ``partition``."""
        part = self.partitions.get(partition)
        if part is None:
            return
        sent = part.unread.pop(seq, None)
        if sent is None:
            sent = part.unacked.pop(seq, None)  # read before its delivery report was served
        if sent is not None:
            part.proven = max(part.proven, sent)
            for older in [s for s in part.unread if s < seq]:
                del part.unread[older]

    def silence(self, partition: int, last_heard: float) -> float:
        """How long an epoch last heard at ``last_heard`` is *proven* silent on ``partition``:
        from its last heartbeat or the partition's last trouble, whichever is later, to the
        newest marker read back. Negative or -inf when there is no proof."""
        part = self.partitions.get(partition)
        if part is None:
            return float("-inf")
        return part.proven - max(last_heard, part.trouble)

    def healthy(self, partition: int) -> bool:
        """Whether the partition has been free of trouble for a whole timeout, as proven by a
        marker read back (for ``stats``)."""
        part = self.partitions.get(partition)
        return part is not None and part.proven - part.trouble > 0
