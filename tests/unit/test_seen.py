"""Exact duplicate detection with bounded memory (yadtqd/worker/seen.py)."""

from __future__ import annotations

from yadtqd.worker.seen import Seen


def test_repeats_are_dropped_and_reordered_runs_taken() -> None:
    seen = Seen()
    assert seen.take(1, "a", 1)
    assert seen.take(3, "c", 1)  # overtook 2 (the other producer)
    assert seen.take(2, "b", 1)
    assert not seen.take(2, "b", 1)
    assert not seen.take(1, "a", 1)
    assert not seen.take(3, "c", 1)
    assert seen.take(4, "d", 1)


def test_memory_stays_flat_over_a_million_grants() -> None:
    seen = Seen()
    for n in range(1, 1_000_001, 2):  # pairs arrive swapped
        assert seen.take(n + 1, "x", 1)
        assert seen.take(n, "x", 1)
    assert seen.floor == 1_000_000 and not seen.above
    assert not seen.take(17, "x", 1)  # still exact: nothing was forgotten


def test_runs_of_older_servers_are_remembered_by_id_and_attempt() -> None:
    seen = Seen()
    assert seen.take(None, "a", 1)
    assert not seen.take(None, "a", 1)
    assert seen.take(None, "a", 2)


def test_a_grant_that_never_comes_does_not_grow_memory_without_bound() -> None:
    from yadtqd.worker import seen as module

    seen = Seen()
    assert seen.take(1, "x", 1)
    for n in range(3, module.MOST_ABOVE + 10):  # grant 2 never arrives
        assert seen.take(n, "x", 1)
    assert len(seen.above) <= module.MOST_ABOVE
    assert seen.floor == module.MOST_ABOVE + 9  # moved past the gap, then caught up
    assert not seen.take(module.MOST_ABOVE, "x", 1)
