"""The execution ledger and the exactly-once contract checked against it (DESIGN section 4).

Every ``ledger`` task appends a ``start`` and an ``end`` line with its task id, attempt, worker,
epoch and pid. :func:`check_contract` reads those lines and the store (through the server's
socket) and asserts the promise: every task terminal with one recorded result, nothing lost,
and a second execution only where the first one's worker epoch was declared dead.
"""

from __future__ import annotations

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


def read(path: Path) -> list[Entry]:
    """Every line of the ledger."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        entries.append(Entry(row["task-id"], row["attempt"], row["epoch"], row["phase"]))
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
    dead = {f["epoch"] for f in cluster.client.failures(limit=100_000)}
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
                assert entry.epoch in dead, (
                    f"{task_id} ran again although epoch {entry.epoch} (attempt {entry.attempt})"
                    " was never declared dead")
        for entry in ends[task_id]:
            if entry.attempt != view["attempt"]:
                assert entry.epoch in dead, f"{task_id} completed twice without a death"
    stale = cluster.client.stats()["counters"].get("stale_events", 0)
    executions = sum(len(v) for v in starts.values())
    return Verdict(len(expected), executions, executions - len(expected), len(dead), stale)
