"""The monitor's frame: cut to the terminal, long lists counted, rates from two snapshots."""

from __future__ import annotations

from typing import Any

from yadtqd.ctl.monitor import render


def snap(ts: float, queued: int, success: int) -> dict[str, Any]:
    tasks = [{"task-id": f"q{i}", "task": "add", "age": 1.0, "waiting": "waiting for a free slot"}
             for i in range(queued)]
    return {"ts": ts, "at": "2026-11-27T22:00:00.000+00:00",
            "totals": {"queued": queued, "processing": 0, "success": success, "failed": 0,
                       "submitted": queued + success},
            "queued": {"count": queued, "tasks": tasks[:50]}, "running": {"count": 0, "tasks": []},
            "workers": [], "failures": {"count": 0, "items": []}, "counters": {}}


def test_long_lists_are_cut_with_a_count_of_the_rest() -> None:
    frame = render(snap(1.0, 200, 0), None, 120, 40, 1.0)
    assert "QUEUED (200, oldest first)" in frame
    shown = [line for line in frame.splitlines() if line.startswith("q")]
    assert f"... and {200 - len(shown)} more" in frame
    assert len(frame.splitlines()) <= 39


def test_a_narrow_short_terminal_gets_a_frame_that_fits() -> None:
    frame = render(snap(1.0, 30, 5), None, 30, 10, 1.0)
    lines = frame.splitlines()
    assert len(lines) <= 9 and all(len(line) <= 30 for line in lines)
    assert lines[0].startswith("YADTQ monitor")


def test_rates_come_from_two_snapshots() -> None:
    frame = render(snap(12.0, 0, 30), snap(10.0, 0, 10), 120, 40, 1.0)
    assert "succeeded 10.0" in frame and "submitted 10.0" in frame
    assert "(after the next refresh)" in render(snap(1.0, 0, 0), None, 120, 40, 1.0)


def test_a_failure_shows_how_many_tasks_it_requeued_also_from_an_older_server() -> None:
    """A failure lists at most 500 re-queued ids and counts them all; a server before schema 12
    sent the whole list and no count."""
    def failure(worker: str, **counted: int) -> dict[str, Any]:
        return {"worker": worker, "epoch": "e", "host": "h", "reason": "no heartbeat",
                "last_heartbeat": "2026-11-27T21:59:50.000+00:00",
                "detected_at": "2026-11-27T22:00:00.000+00:00", "requeued": ["t1", "t2"], **counted}

    frame = snap(1.0, 0, 0)
    frame["failures"] = {"count": 2, "items": [failure("new-one", requeued_count=1234), failure("old-one")]}
    lines = render(frame, None, 120, 40, 1.0).splitlines()
    assert [line.split()[-1] for line in lines if line.startswith(("new-one", "old-one"))] == ["1234", "2"]
