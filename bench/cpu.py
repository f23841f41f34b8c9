"""Where the CPU goes: CPU time per task of each role during throughput runs.

    .venv/bin/python bench/cpu.py [--tasks 20000] [--workers 1 2 4] [--runs 3] [--warmup 80000]

Reads user + system time from /proc for the broker (the Java process), the server, the
workers' main processes and their execution processes, before and after each run, and
prints microseconds of CPU per task for each. On a machine whose cores are all busy, the sum
is what bounds throughput. Uses ``YADTQ_TEST_BOOTSTRAP`` if set (its broker is found among the
processes by its command line), else starts a broker of its own.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import broker, cluster, submit_all, summary, wait_done  # noqa: E402
from tabulate import tabulate  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
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
            fields = stat[stat.rindex(")") + 2:].split()
            totals[role] += (int(fields[11]) + int(fields[12])) / TICK
    return totals


def run(bootstrap: str, tasks: int, workers: int) -> tuple[float, dict[str, float]]:
    """(tasks/s, CPU microseconds per task by role) for one run."""
    with cluster(bootstrap, workers) as c:
        before = cpu_by_role()
        start = time.perf_counter()
        submit_all(bootstrap, c.prefix, tasks)
        wait_done(c, tasks)
        elapsed = time.perf_counter() - start
        after = cpu_by_role()
    return tasks / elapsed, {r: (after[r] - before[r]) / tasks * 1e6 for r in ROLES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=80_000)
    args = parser.parse_args()
    with broker() as bootstrap:
        if args.warmup:
            run(bootstrap, args.warmup, 2)
        results = {w: [run(bootstrap, args.tasks, w) for _ in range(args.runs)] for w in args.workers}
    print(f"\nCPU microseconds per task (median of {args.runs} runs of {args.tasks:,} tasks;"
          " workers of 2 slots)\n")
    rows = [[role, *[f"{summary([per[role] for _, per in results[w]])[0]:,.0f}" for w in args.workers]]
            for role in ROLES]
    rows.append(["all", *[f"{summary([sum(per.values()) for _, per in results[w]])[0]:,.0f}"
                          for w in args.workers]])
    rows.append(["tasks/s", *[f"{summary([rate for rate, _ in results[w]])[0]:,.0f}" for w in args.workers]])
    print(tabulate(rows, headers=["role", *[f"{w} worker(s)" for w in args.workers]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
