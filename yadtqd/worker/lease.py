"""When a worker may start a granted task: only while it can prove its epoch was not declared
dead (DESIGN section 6: a worker that is not heartbeating starts nothing; once it resumes it
starts nothing of an epoch it cannot prove is still live).

The server declares an epoch dead only after a whole ``heartbeat_timeout`` (``T``, carried in
every ``run`` as ``lease``) in which nothing of the epoch was appended to its ``events``
partition. So a heartbeat *sent* at ``S`` and appended guarantees no death before ``S + T``.
The worker keeps a chain of such heartbeats from a point known to be live (its ``hello``, or a
heartbeat the server answered with ``alive``): a heartbeat links to the chain when the broker
acknowledged it less than ``3T/4`` after the previous link was sent, so two links are never
appended ``T`` apart and the server cannot have declared a death between them. While the chain
holds, a task may start until ``T/2`` after the newest link was sent (half the timeout is the
margin for clocks and scheduling).

A heartbeat acknowledged too late breaks the chain (the worker was frozen, stalled, or cut off,
or the broker was): the epoch may have been declared dead meanwhile. The worker then starts
nothing; each heartbeat asks (``probe``) and the server answers ``alive`` if the epoch is live
(and ``fenced`` if not). The answered heartbeat is the chain's new start, and the heartbeats
acknowledged since are checked against it in turn.

All times are ``time.monotonic()`` of the worker process.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Beat:
    """One heartbeat: when it was sent, and when the broker acknowledged it (if it did)."""

    sent: float
    acked: float | None = None


@dataclass
class Lease:
    """The proof that this epoch may still start tasks."""

    #: The server's heartbeat timeout: ``[server] heartbeat_timeout`` from the worker's own
    #: configuration until a ``run`` says otherwise (None: no check is made).
    timeout: float | None = None
    #: Send time of the newest link of the chain.
    anchor: float = float("-inf")
    broken: bool = False
    seq: int = 0
    #: Heartbeats not yet part of the chain (seq → beat), oldest first.
    beats: dict[int, Beat] = field(default_factory=dict)

    def learn(self, timeout: float) -> None:
        """The server's timeout, as a ``run`` carries it. A shorter one than the chain was
        checked against breaks the chain (the links may be too far apart for it)."""
        if self.timeout is not None and timeout < self.timeout:
            self.broken = True
        self.timeout = timeout

    def restart(self, mono: float) -> None:
        """A new epoch said ``hello`` at ``mono``: it cannot be declared dead before the server
        registers it, so the chain starts there."""
        self.anchor, self.broken, self.beats = mono, False, {}

    def sent(self, mono: float) -> int:
        """A heartbeat is being sent; returns its number (it carries it as ``probe`` while the
        chain is :attr:`broken`, asking the server to answer)."""
        self._check_overdue(mono)
        self.seq += 1
        self.beats[self.seq] = Beat(mono)
        if len(self.beats) > 1000:  # never acknowledged, never answered: forget the oldest
            del self.beats[next(iter(self.beats))]
        return self.seq

    def acked(self, seq: int, ok: bool, mono: float) -> None:
        """The broker's delivery report for heartbeat ``seq``."""
        beat = self.beats.get(seq)
        if beat is None:
            return
        if not ok:
            del self.beats[seq]  # never appended: it neither links nor breaks the chain
            return
        beat.acked = mono
        if not self.broken:
            self._link()

    def alive(self, seq: int) -> None:
        """The server answered heartbeat ``seq``: the epoch was live when it applied it."""
        beat = self.beats.get(seq)
        if beat is None or not self.broken:
            return
        self.anchor, self.broken = beat.sent, False
        for older in [s for s in self.beats if s <= seq]:
            del self.beats[older]
        self._link()

    def horizon(self) -> float:
        """The monotonic time until which a granted task may start, as far as known now (a batch
        handed over now starts none of its jobs after it)."""
        return float("inf") if self.timeout is None else self.anchor + self.timeout / 2

    def may_start(self, mono: float) -> bool:
        """Whether a granted task may start now."""
        if self.timeout is None:
            return True
        self._check_overdue(mono)
        return not self.broken and mono < self.anchor + self.timeout / 2

    def _link(self) -> None:
        """Extend the chain with the acknowledged heartbeats, in order, or break it."""
        limit = 0.75 * self.timeout if self.timeout is not None else float("inf")
        for seq in list(self.beats):
            beat = self.beats[seq]
            if beat.acked is None:
                return
            del self.beats[seq]
            if beat.acked - self.anchor >= limit:
                self.broken = True
                return
            self.anchor = max(self.anchor, beat.sent)

    def _check_overdue(self, mono: float) -> None:
        """No acknowledged heartbeat for ``3T/4`` since the newest link: whatever comes next
        cannot link, so the chain is broken now (the worker asks at its next heartbeat)."""
        if self.timeout is not None and not self.broken and mono - self.anchor >= 0.75 * self.timeout:
            self.broken = True
