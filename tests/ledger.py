"""The execution ledger and the exactly-once contract checked against it (DESIGN section 4).

Every ``ledger`` task appends a ``start`` and an ``end`` line with its task id, attempt, worker,
epoch, pid and time. :func:`check_contract` reads those lines and the store (through the
server's socket) and asserts the promise: every task terminal with one recorded result, nothing
lost, and a second execution only where it answers a specific re-queue: a failure record of the
earlier execution's epoch that names this task among the tasks it re-queued, with the earlier
execution started before that death.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.cluster import Cluster


@dataclass(frozen=True)
class Entry:
    task_id: str
    attempt: int
    epoch: str
    phase: str
    ts: float = 0.0


def read(path: Path) -> list[Entry]:
    """Every line of the ledger."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        entries.append(Entry(row["task-id"], row["attempt"], row["epoch"], row["phase"], row["ts"]))
    return entries


@dataclass
class Verdict:
    """What the check found, for the test's report."""

    tasks: int
    executions: int
    re_executions: int
    dead_epochs: int
    stale_events: int


def check_contract(cluster: Cluster, ledger: Path, expected: dict[str, Any]) -> Verdict:
    """Assert the exactly-once contract for tasks ``expected`` (task id → expected result)."""
    statuses = cluster.status(list(expected))
    failures = cluster.client.failures(limit=10_000)
    dead = {f["epoch"] for f in failures}
    #: (epoch, task id) → when that epoch was declared dead, for each task it re-queued.
    requeued = {(f["epoch"], t): _epoch_seconds(f["detected_at"]) for f in failures for t in f["requeued"]}
    starts: dict[str, list[Entry]] = defaultdict(list)
    ends: dict[str, list[Entry]] = defaultdict(list)
    for entry in read(ledger):
        (starts if entry.phase == "start" else ends)[entry.task_id].append(entry)
    for task_id, result in expected.items():
        view = statuses[task_id]
        assert view["status"] != "unknown", f"{task_id} was lost"
        assert view["status"] == "success", f"{task_id} is {view['status']}: {view.get('error')}"
        assert view["result"] == result, f"{task_id}: {view['result']!r} != {result!r}"
        attempts = [e.attempt for e in starts[task_id]]
        assert len(attempts) == len(set(attempts)), f"{task_id}: an attempt ran twice: {attempts}"
        recorded = [e for e in starts[task_id] if e.attempt == view["attempt"]]
        assert len(recorded) == 1, f"{task_id}: the recorded attempt {view['attempt']} never started"
        for entry in starts[task_id]:
            if entry.attempt != view["attempt"]:
                death = requeued.get((entry.epoch, task_id))
                assert death is not None, (
                    f"{task_id} ran again although no death of epoch {entry.epoch} (attempt"
                    f" {entry.attempt}) re-queued it")
                assert entry.ts < death, (
                    f"{task_id} attempt {entry.attempt} started in epoch {entry.epoch}"
                    f" {entry.ts - death:.3f} s after that epoch was declared dead")
        for entry in ends[task_id]:
            if entry.attempt != view["attempt"]:
                assert entry.epoch in dead, f"{task_id} completed twice without a death"
    stale = cluster.client.stats()["counters"].get("stale_events", 0)
    executions = sum(len(v) for v in starts.values())
    return Verdict(len(expected), executions, executions - len(expected), len(dead), stale)


def starts_after_death(cluster: Cluster, ledger: Path) -> list[Entry]:
    """Executions that started in an epoch after that epoch was declared dead (the contract
    forbids them: a worker that cannot prove its epoch live starts nothing)."""
    deaths = {f["epoch"]: _epoch_seconds(f["detected_at"])
              for f in cluster.client.failures(limit=10_000)}
    return [e for e in read(ledger) if e.phase == "start" and e.epoch in deaths
            and e.ts >= deaths[e.epoch]]


def _epoch_seconds(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()
