"""The worker's proof of liveness (yadtqd/worker/lease.py): it may start a task only while a
chain of promptly acknowledged heartbeats links it to a moment its epoch was known live."""

from __future__ import annotations

from yadtqd.worker.lease import Lease

T = 4.0  # the server's heartbeat timeout


def _lease(start: float = 0.0) -> Lease:
    lease = Lease(timeout=T)
    lease.restart(start)
    return lease


def _beat(lease: Lease, sent: float, acked: float | None) -> int:
    seq = lease.sent(sent)
    if acked is not None:
        lease.acked(seq, True, acked)
    return seq


def test_steady_heartbeats_keep_the_lease() -> None:
    lease = _lease()
    for t in range(1, 20):
        _beat(lease, t, t + 0.01)
        assert lease.may_start(t + 0.5)
    assert not lease.broken


def test_no_check_without_a_timeout_from_the_server() -> None:
    assert Lease().may_start(1e9)


def test_a_frozen_worker_starts_nothing_after_it_wakes() -> None:
    lease = _lease()
    _beat(lease, 1.0, 1.01)
    assert lease.may_start(2.0)
    # frozen from 2 s to 11 s: on waking, nothing may start
    assert not lease.may_start(11.0)
    # a heartbeat sent on waking and acknowledged at once does not restore the lease...
    seq = _beat(lease, 11.0, 11.01)
    assert lease.broken and not lease.may_start(11.02)
    # ...only the server's answer to it does
    lease.alive(seq)
    assert lease.may_start(11.05)


def test_the_heartbeat_sent_while_broken_asks_for_an_answer() -> None:
    lease = _lease()
    assert not lease.broken
    lease.sent(5.0)  # 5 s after the anchor: overdue
    assert lease.broken


def test_a_late_acknowledgement_breaks_the_chain() -> None:
    """Heartbeats held up in the producer (the worker was cut off) and delivered late may be
    appended after the server declared the epoch dead: they prove nothing."""
    lease = _lease()
    _beat(lease, 1.0, 1.01)
    seq = lease.sent(1.5)
    lease.acked(seq, True, 1.0 + 0.75 * T + 0.1)
    assert lease.broken
    assert not lease.may_start(1.5 + 0.1)


def test_a_lost_heartbeat_does_not_break_a_chain_that_holds() -> None:
    lease = _lease()
    _beat(lease, 1.0, 1.01)
    lost = lease.sent(1.5)
    lease.acked(lost, False, 1.6)
    _beat(lease, 2.0, 2.01)
    assert not lease.broken and lease.may_start(2.5)


def test_an_answer_to_an_older_probe_restores_from_that_probe() -> None:
    lease = _lease()
    assert not lease.may_start(10.0)
    first = _beat(lease, 10.0, 10.01)
    _beat(lease, 11.0, 11.01)
    lease.alive(first)
    assert not lease.broken
    assert lease.anchor == 11.0  # the later acknowledged heartbeat links on
    assert lease.may_start(12.0) and not lease.may_start(11.0 + T / 2)


def test_a_new_epoch_starts_a_new_chain() -> None:
    lease = _lease()
    assert not lease.may_start(20.0)
    lease.restart(20.0)
    assert lease.may_start(20.1)


def test_before_any_run_the_workers_own_setting_is_the_timeout() -> None:
    """A worker's first epoch has no run yet, so no timeout from the server: the worker's own
    [server] heartbeat_timeout holds meanwhile, and late acknowledgements still break the
    chain (a cut-off idle worker whose held heartbeats arrive late proves nothing)."""
    lease = Lease(timeout=T)
    lease.restart(0.0)
    seq = lease.sent(1.0)
    lease.acked(seq, True, 30.0)
    assert lease.broken and not lease.may_start(30.1)


def test_a_shorter_timeout_from_the_server_asks_again() -> None:
    lease = _lease()
    _beat(lease, 1.0, 1.01)
    lease.learn(T / 2)
    assert lease.broken and not lease.may_start(1.1)
    lease.learn(T / 2)  # the same again changes nothing more
    seq = _beat(lease, 1.2, 1.21)
    lease.alive(seq)
    assert lease.may_start(1.3)
