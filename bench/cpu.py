"""Where the CPU goes: CPU time per task of each role during throughput runs.

    .venv/bin/python bench/cpu.py [--tasks 20000] [--workers 1 2 4] [--runs 3] [--warmup 40000]
                                  [--threads]

Reads user + system time from /proc for the broker (the Java process), the server, the
workers' main processes and their execution processes, before and after each run, and
prints microseconds of CPU per task for each. On a machine whose cores are all busy, the sum
is what bounds throughput. ``--threads`` also splits each role by thread name (``python`` is
the interpreter's threads, ``rdk:broker*`` librdkafka's, the rest the broker's JVM: its request
threads are ``data-plane-kafk``, its JIT ``C2 CompilerThre``), and says how long the threads
of each name waited for a CPU while ready to run (``/proc/.../schedstat``): on a machine whose
cores are all busy, the server's loop, which does one task at a time, waits there too. Uses
``YADTQ_TEST_BOOTSTRAP`` if set (its broker is found among the processes by its command line),
else starts a broker of its own.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import broker, cluster, cpu_seconds, submit_all, summary, wait_done, warm  # noqa: E402
from tabulate import tabulate  # noqa: E402

ROLES = ("broker", "server", "worker", "execution")


def _role(cmdline: str) -> str | None:
    if "kafka.Kafka" in cmdline:
        return "broker"
    if "yadtqd.cli server" in cmdline:
        return "server"
    if "yadtqd.cli worker" in cmdline:
        return "worker"
    if "multiprocessing.spawn" in cmdline:
        return "execution"
    return None


def cpu_by_thread() -> dict[tuple[str, str], tuple[float, float]]:
    """Seconds of CPU used so far by the threads of each role, and seconds they waited for a
    CPU while ready to run (the run queue, from ``schedstat``), by (role, thread name); the
    threads of processes that exited are gone, so compare only what runs throughout."""
    totals: dict[tuple[str, str], tuple[float, float]] = collections.defaultdict(lambda: (0.0, 0.0))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            role = _role(Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            if role is None:
                continue
            for tid in os.listdir(f"/proc/{entry}/task"):
                name = Path(f"/proc/{entry}/task/{tid}/comm").read_text().strip()
                used = cpu_seconds(Path(f"/proc/{entry}/task/{tid}/stat").read_text())
                waited = int(Path(f"/proc/{entry}/task/{tid}/schedstat").read_text().split()[1]) / 1e9
                was = totals[role, name]
                totals[role, name] = (was[0] + used, was[1] + waited)
        except OSError:
            continue  # exited meanwhile
    return totals


def cpu_by_role() -> dict[str, float]:
    """Seconds of CPU (user + system) used so far by every process of each role."""
    totals = dict.fromkeys(ROLES, 0.0)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        role = _role(cmdline)
        if role:
            totals[role] += cpu_seconds(stat)
    return totals


def run(bootstrap: str, tasks: int, workers: int,
        threads: dict[tuple[str, str], float] | None = None,
        waits: dict[tuple[str, str], float] | None = None) -> tuple[float, dict[str, float]]:
    """(tasks/s, CPU microseconds per task by role) for one run; adds the microseconds per task
    of each (role, thread name) to ``threads``, and the seconds its threads waited for a CPU
    per second of the run to ``waits``, when given."""
    with cluster(bootstrap, workers) as c:
        before, threads_before = cpu_by_role(), cpu_by_thread()
        start = time.perf_counter()
        ids, _ = submit_all(bootstrap, c.prefix, tasks)
        wait_done(c, tasks, last=ids[-1])
        elapsed = time.perf_counter() - start
        after, threads_after = cpu_by_role(), cpu_by_thread()
    for key, (seconds, waited) in threads_after.items():
        was = threads_before.get(key, (0.0, 0.0))
        if threads is not None:
            threads[key] += (seconds - was[0]) / tasks * 1e6
        if waits is not None:
            waits[key] += (waited - was[1]) / elapsed
    return tasks / elapsed, {r: (after[r] - before[r]) / tasks * 1e6 for r in ROLES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=40_000,
                        help="tasks a warm-up round, rounds until the broker's JIT settles (0: none)")
    parser.add_argument("--threads", action="store_true", help="split each role by thread name")
    args = parser.parse_args()
    threads: dict[int, dict[tuple[str, str], float]] = {
        w: collections.defaultdict(float) for w in args.workers}
    waits: dict[int, dict[tuple[str, str], float]] = {
        w: collections.defaultdict(float) for w in args.workers}
    with broker() as bootstrap:
        if args.warmup:
            warm(bootstrap, lambda: run(bootstrap, args.warmup, 2))
        results = {w: [run(bootstrap, args.tasks, w, threads[w], waits[w]) for _ in range(args.runs)]
                   for w in args.workers}
    print(f"\nCPU microseconds per task (median of {args.runs} runs of {args.tasks:,} tasks;"
          " workers of 2 slots)\n")
    rows = [[role, *[f"{summary([per[role] for _, per in results[w]])[0]:,.0f}" for w in args.workers]]
            for role in ROLES]
    rows.append(["all", *[f"{summary([sum(per.values()) for _, per in results[w]])[0]:,.0f}"
                          for w in args.workers]])
    rows.append(["tasks/s", *[f"{summary([rate for rate, _ in results[w]])[0]:,.0f}" for w in args.workers]])
    print(tabulate(rows, headers=["role", *[f"{w} worker(s)" for w in args.workers]]))
    if args.threads:
        print(f"\nBy thread name, mean of {args.runs} runs (µs per task; under 5 left out)\n")
        keys = sorted({k for w in args.workers for k, v in threads[w].items() if v / args.runs >= 5},
                      key=lambda k: (ROLES.index(k[0]), -threads[args.workers[0]].get(k, 0.0)))
        print(tabulate([[role, name, *[f"{threads[w].get((role, name), 0.0) / args.runs:,.0f}" for w in args.workers]]
                        for role, name in keys],
                       headers=["role", "thread", *[f"{w} worker(s)" for w in args.workers]]))
        print(f"\nWaiting for a CPU while ready to run, by thread name, mean of {args.runs} runs"
              " (seconds a second of the run, summed over the threads of that name; the server's"
              " \"python\" is mostly its loop, which does one task at a time)\n")
        print(tabulate([[role, name, *[f"{waits[w].get((role, name), 0.0) / args.runs:.2f}" for w in args.workers]]
                        for role, name in keys],
                       headers=["role", "thread", *[f"{w} worker(s)" for w in args.workers]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
