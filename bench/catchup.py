"""Consumers catching up on records of kilobytes: a new standby's rebuild from the changelog, and
tasks with large arguments.

    .venv/bin/python bench/catchup.py [--tasks 60000] [--big 5000] [--arg-bytes 8000] [--runs 2]

Two figures a run, each on a fresh set of topics with a server and two workers:

- rebuild: ``--tasks`` ``add`` tasks run, the workers stopped, then a standby started on an empty
  database; the seconds until its counts show every task a success (it read the changelog, about
  three records of half a kilobyte a task, from its start);
- large arguments: ``--big`` ``echo`` tasks whose argument is a string of ``--arg-bytes``
  characters, produced at once; tasks a second until the last is done.

Both read more than a consumer's fetch-ahead limit (``queued.max.messages.kbytes``, 4 MiB) in a
fraction of a second, which is where librdkafka's pause before fetching again
(``fetch.queue.backoff.ms``) shows. Uses ``YADTQ_TEST_BOOTSTRAP`` if set, else starts a broker of
its own.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import broker, cluster, submit_all, summary, wait_done  # noqa: E402


def rebuild(bootstrap: str, tasks: int) -> float:
    """Seconds a new standby takes to hold ``tasks`` finished tasks it read from the changelog."""
    with cluster(bootstrap, 2) as c:
        ids, _ = submit_all(bootstrap, c.prefix, tasks)
        wait_done(c, tasks, last=ids[-1])
        c.stop("bench0")
        c.stop("bench1")
        start = time.perf_counter()
        standby = c.start_standby("server2")
        while standby.stats()["tasks"].get("success", 0) < tasks:
            time.sleep(0.05)  # a question to the standby's socket, not to the loop measured
        return time.perf_counter() - start


def large_arguments(bootstrap: str, tasks: int, size: int) -> float:
    """Tasks a second, ``tasks`` ``echo`` tasks of a ``size``-character argument produced at once."""
    with cluster(bootstrap, 2) as c:
        start = time.perf_counter()
        ids, _ = submit_all(bootstrap, c.prefix, tasks, message=lambda task_id, _: {
            "task-id": task_id, "task": "echo", "args": ["x" * size]})
        wait_done(c, tasks, last=ids[-1])
        rate = tasks / (time.perf_counter() - start)
        done = c.client.stats()["tasks"]
        if done.get("success") != tasks:
            raise SystemExit(f"of {tasks} echo tasks, {done}")
        return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=60_000, help="tasks the rebuild reads")
    parser.add_argument("--big", type=int, default=5_000, help="tasks with large arguments")
    parser.add_argument("--arg-bytes", type=int, default=8_000)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    seconds, rates = [], []
    with broker() as bootstrap:
        for n in range(args.runs):
            seconds.append(rebuild(bootstrap, args.tasks))
            rates.append(large_arguments(bootstrap, args.big, args.arg_bytes))
            print(f"run {n + 1}: rebuild of {args.tasks:,} tasks {seconds[-1]:.2f} s"
                  f" ({args.tasks / seconds[-1]:,.0f} tasks/s); {args.big:,} tasks of"
                  f" {args.arg_bytes:,}-byte arguments {rates[-1]:,.0f} tasks/s", flush=True)
    med, lo, hi = summary(seconds)
    print(f"rebuild: median {med:.2f} s ({lo:.2f}..{hi:.2f})")
    med, lo, hi = summary(rates)
    print(f"large arguments: median {med:,.0f} tasks/s ({lo:,.0f}..{hi:,.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
