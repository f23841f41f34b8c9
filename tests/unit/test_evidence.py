"""Death evidence (yadtqd/server/evidence.py): silence counts only when a marker proves the
partition readable, and only from the partition's last trouble on."""

from __future__ import annotations

from yadtqd.server.evidence import Evidence

T = 4.0


def _evidence() -> Evidence:
    ev = Evidence("me", T, started=0.0)
    ev.watch(range(2))
    return ev


def _mark(ev: Evidence, partition: int, sent: float, acked: float | None, read: bool = True) -> None:
    seq = ev.sent(partition, sent)
    if acked is not None:
        ev.acked(partition, seq, True, acked)
        if read:
            ev.read_back(partition, seq)


def test_silence_is_proven_by_a_marker_read_back() -> None:
    ev = _evidence()
    assert ev.silence(0, last_heard=1.0) == float("-inf")
    _mark(ev, 0, 6.0, 6.01)
    assert ev.silence(0, last_heard=1.0) == 5.0
    assert ev.silence(1, last_heard=1.0) == float("-inf")  # another partition proves nothing


def test_a_marker_not_read_back_proves_nothing() -> None:
    ev = _evidence()
    _mark(ev, 0, 6.0, 6.01, read=False)
    assert ev.silence(0, last_heard=1.0) == float("-inf")


def test_a_frozen_broker_is_trouble_and_silence_restarts_after_it() -> None:
    ev = _evidence()
    seq = ev.sent(0, 2.0)
    assert 0 not in ev.due(2.0 + T)  # one marker unacknowledged at a time...
    assert ev.partitions[0].trouble == 2.0 + T  # ...and past the slow limit: trouble noted
    ev.acked(0, seq, True, 30.0)  # the broker wakes: a late acknowledgement is trouble too
    _mark(ev, 0, 31.0, 31.01)
    assert ev.silence(0, last_heard=1.0) == 1.0  # counted from the trouble at 30 s, not from 1 s
    _mark(ev, 0, 35.0, 35.01)
    assert ev.silence(0, last_heard=1.0) == 5.0


def test_a_failed_delivery_is_trouble() -> None:
    ev = _evidence()
    seq = ev.sent(0, 5.0)
    ev.acked(0, seq, False, 5.1)
    _mark(ev, 0, 6.0, 6.01)
    assert ev.silence(0, last_heard=1.0) == 6.0 - 5.1


def test_the_servers_start_counts_as_trouble() -> None:
    ev = Evidence("me", T, started=100.0)
    ev.watch(range(1))
    _mark(ev, 0, 102.0, 102.01)
    assert ev.silence(0, last_heard=50.0) == 2.0


def test_a_slow_loop_is_not_a_slow_broker() -> None:
    """The acknowledgement's own latency decides, not when the loop served it."""
    ev = _evidence()
    seq = ev.sent(0, 1.0)
    ev.acked(0, seq, True, mono=9.0, latency=0.002)
    ev.read_back(0, seq)
    assert ev.silence(0, last_heard=-10.0) == 1.0  # no trouble: from the start (0) to the marker


def test_partitions_without_proof_are_named() -> None:
    ev = _evidence()
    _mark(ev, 0, 1.0, 1.01)
    assert ev.unproven(20.0, limit=3 * T) == [(0, 19.0), (1, 20.0)]
    assert ev.unproven(10.0, limit=3 * T) == []
