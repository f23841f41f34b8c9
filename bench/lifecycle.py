"""The task lifecycle's figures (issue 14): retention under load, scheduled tasks held, and
how late scheduled tasks start.

    .venv/bin/python bench/lifecycle.py [--tasks 300000] [--step 50000] [--scheduled 100000] [--late 200]

1. Retention: ``--tasks`` tasks through 100 simulated workers (bench/scale.py) with
   ``[server] keep_finished = 60``; after each step, the tasks kept, the database size (with its
   WAL) and the server's RSS: flat once the first minute's tasks are purged.
2. ``--scheduled`` tasks submitted with a one-hour delay: the server's RSS before and after,
   and how many a worker holds (none: they are rows of the database only).
3. ``--late`` tasks with an ``eta`` 5 to 15 s ahead, two workers: how late each started after
   its eta (the worker's start time less the eta), median, p99 and max.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import broker, cluster, percentile, submit_all  # noqa: E402
from scale import Simulator, rss_mib  # noqa: E402



def retention(bootstrap: str, tasks: int, step: int) -> None:
    print(f"{'tasks':>9} {'kept':>8} {'db MiB':>8} {'server RSS MiB':>15}", flush=True)
    with cluster(bootstrap, 0, server={"keep_finished": 60.0}) as c:
        sim = Simulator(bootstrap, c.prefix, 100)
        c.wait_for(lambda: len(c.live_workers()) == 100, "the simulated workers")
        pid = c.processes["server"].pid
        done = 0
        while done < tasks:
            submit_all(bootstrap, c.prefix, min(step, tasks - done))
            done += min(step, tasks - done)
            c.wait_for(lambda: _ended(c) >= done, f"{done} tasks to end", timeout=3600)
            db = sum(p.stat().st_size for p in Path(c.database).parent.glob("yadtq.db*")) / 2**20
            kept = sum(c.client.stats()["tasks"].values())
            print(f"{done:>9,} {kept:>8,} {db:>8,.1f} {rss_mib(pid):>15,.1f}", flush=True)
        sim.close()


def _ended(c) -> int:  # type: ignore[no-untyped-def]
    stats = c.client.stats()
    return stats["tasks"].get("success", 0) + stats["counters"].get("purged", 0)


def scheduled(bootstrap: str, count: int) -> None:
    with cluster(bootstrap, 1) as c:
        pid = c.processes["server"].pid
        print(f"scheduled tasks held: server RSS {rss_mib(pid):.1f} MiB with none", flush=True)
        for step in (1, 2):
            submit_all(bootstrap, c.prefix, count // 2, message=lambda task_id, i: {
                "task-id": task_id, "task": "add", "args": [i, 1], "delay": 3600})
            c.wait_for(lambda: c.client.stats()["tasks"].get("scheduled", 0) == step * (count // 2),
                       "every task recorded", timeout=600)
            time.sleep(5)  # a few turns with all of them waiting: what they cost while they wait
            held = sum(w["granted"] + w["running"] for w in c.client.workers())
            print(f"{step * (count // 2):,} scheduled: server RSS {rss_mib(pid):.1f} MiB; held by workers:"
                  f" {held}", flush=True)


def lateness(bootstrap: str, count: int) -> None:
    with cluster(bootstrap, 2) as c:
        start = time.time() + 5.0
        etas = {}
        for i in range(count):
            eta = start + 10.0 * i / count
            task_id = c.client.submit("add", i, 1, eta=dt.datetime.fromtimestamp(eta, dt.timezone.utc))
            etas[task_id] = eta
        late = []
        for task_id, eta in etas.items():
            view = c.client.result(task_id, wait=120)
            late.append(dt.datetime.fromisoformat(view["started_at"]).timestamp() - eta)
        print(f"{count} tasks with an eta: started late by median {1000 * percentile(late, 0.5):.0f} ms,"
              f" p99 {1000 * percentile(late, 0.99):.0f} ms, max {1000 * max(late):.0f} ms"
              f" (min {1000 * min(late):.0f} ms)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300_000)
    parser.add_argument("--step", type=int, default=50_000)
    parser.add_argument("--scheduled", type=int, default=100_000)
    parser.add_argument("--late", type=int, default=200)
    args = parser.parse_args()
    with broker() as bootstrap:
        if args.late:
            lateness(bootstrap, args.late)
        if args.scheduled:
            scheduled(bootstrap, args.scheduled)
        if args.tasks:
            retention(bootstrap, args.tasks, args.step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
