"""The cost of ``PRAGMA synchronous=FULL`` against ``NORMAL`` on this machine's disk.

    .venv/bin/python bench/sync.py [--turns 2000] [--batch 10] [--runs 3]

The server commits once per Kafka batch and once per planning turn; each turn here is one write
transaction that records ``--batch`` submissions and grants them, as the server's loop does.
Prints commits per second and the commit latency (p50, p99) under each setting, each the median
of ``--runs`` runs, in a directory on the same file system as the working tree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tabulate import tabulate  # noqa: E402

from yadtqd import messages as m  # noqa: E402
from yadtqd.store import Store  # noqa: E402


def run(path: Path, synchronous: str, turns: int, batch: int) -> tuple[float, list[float]]:
    """(transactions per second, commit latencies in seconds) for one run."""
    store = Store(path, create=True)
    store.db.execute(f"PRAGMA synchronous={synchronous}")
    hello = m.Hello(worker="w", epoch="e", ts=0, host="h", pid=1, slots=2, tasks={}, version="0")
    with store.transaction():
        store.hello(hello, 0.0, 0, 0)
    commits = []
    start = time.perf_counter()
    for turn in range(turns):
        began = time.perf_counter()
        with store.transaction():
            for i in range(batch):
                task_id = f"t{turn}-{i}"
                store.intake(m.Submission(task_id=task_id, task="add", args=[i, 1]), 1.0)
                store.grant(task_id, "w", "e", 1.0, turn * batch + i + 1)
        commits.append(time.perf_counter() - began)
    elapsed = time.perf_counter() - start
    store.close()
    return turns / elapsed, commits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for synchronous in ("NORMAL", "FULL"):
        rates, latencies = [], []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
                rate, commits = run(Path(tmp) / "bench.db", synchronous, args.turns, args.batch)
            rates.append(rate)
            latencies += commits
        latencies.sort()
        rows.append([synchronous, f"{sorted(rates)[len(rates) // 2]:,.0f}",
                     f"{latencies[len(latencies) // 2] * 1e3:.2f}",
                     f"{latencies[int(len(latencies) * 0.99)] * 1e3:.2f}"])
    print(tabulate(rows, headers=["synchronous", "transactions/s", "commit p50 ms", "commit p99 ms"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
