"""YADTQ benchmarks: one command, one table.

    .venv/bin/python bench/run.py [--tasks 10000] [--runs 3] [--latency 500] [--kills 10] [--warmup 40000]
                                  [--scale 1000000]

Throughput (first submit to last result readable) with 1, 2 and 4 workers and the submit rate
alone; sequential latency, and latency of a task sent after 3 s of idle, beside what the same
idle costs raw Kafka's hops and the machine alone (:mod:`wake`); the raw-Kafka limit
through the same hops on the same broker, and YADTQ as a ratio of it; throughput and latency
with a standby server following; failover of a worker and takeovers of the active server
(``--kills`` each); with ``--scale N``, the server's rate with 100 simulated workers and its
database and memory after N tasks. Each figure is the median of ``--runs`` runs with min and
max. Uses ``YADTQ_TEST_BOOTSTRAP`` if set, else starts a broker of its own. Logging is at the
default level (info), as deployed. First, ``--warmup`` messages go through the raw hops and
rounds of ``--warmup`` tasks through YADTQ, unreported, until the broker's JIT settles (a
round in which it took under 5 % of the broker's CPU; :func:`common.warm`): a fresh broker
compiles for hundreds of thousands of messages (its CPU per task fell from 630 to 130 us over
the first 60,000 here, and its compiler still took a third of it after 120,000).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import raw  # noqa: E402
import wake  # noqa: E402
from common import MachineBusy, broker, cluster, percentile, submit_all, summary, wait_done, warm  # noqa: E402
from tabulate import tabulate  # noqa: E402


def throughput(bootstrap: str, tasks: int, workers: int, prefetch: int = -1,
               standby: bool = False) -> tuple[float, float, float]:
    """(end-to-end tasks/s, submit rate/s, the machine's CPU busy share) for one run."""
    with cluster(bootstrap, workers, prefetch=prefetch, standby=standby) as c:
        busy = MachineBusy()
        start = time.perf_counter()
        ids, submit_seconds = submit_all(bootstrap, c.prefix, tasks)
        wait_done(c, tasks, last=ids[-1])
        return tasks / (time.perf_counter() - start), tasks / submit_seconds, busy.share()


def log_lines(bootstrap: str, tasks: int) -> tuple[float, float]:
    """Lines logged at info per task (server; the two workers together) for ``tasks`` ``add``."""
    with cluster(bootstrap, 2) as c:
        names = ["server", "bench0", "bench1"]
        before = {n: c.log(n).count("\n") for n in names}
        ids, _ = submit_all(bootstrap, c.prefix, tasks)
        wait_done(c, tasks, last=ids[-1])
        lines = {n: c.log(n).count("\n") - before[n] for n in names}
        return lines["server"] / tasks, (lines["bench0"] + lines["bench1"]) / tasks


def latency(bootstrap: str, count: int, kafka: dict[str, object] | None = None,
            standby: bool = False) -> list[float]:
    """Seconds from submit to result readable, one task at a time, over the socket."""
    with cluster(bootstrap, 1, kafka=kafka, standby=standby) as c:
        out = []
        for i in range(count):
            start = time.perf_counter()
            task_id = c.client.submit("add", i, 1)
            c.client.result(task_id, wait=30)
            out.append(time.perf_counter() - start)
        return out


def idle_latency(bootstrap: str, count: int = 20, idle: float = 3.0) -> list[float]:
    """Seconds from submit to result readable for tasks each sent after ``idle`` seconds in
    which the cluster had nothing to do (the peers' part I)."""
    with cluster(bootstrap, 1) as c:
        c.client.result(c.client.submit("add", 0, 1), wait=30)
        out = []
        for i in range(count):
            time.sleep(idle)  # the point: a cluster left idle, not a wait for an event
            start = time.perf_counter()
            c.client.result(c.client.submit("add", i, 1), wait=30)
            out.append(time.perf_counter() - start)
        return out


def fmt(values: list[float], unit: str = "", scale: float = 1.0, digits: int = 0) -> str:
    med, lo, hi = summary([v * scale for v in values])
    return f"{med:,.{digits}f}{unit} ({lo:,.{digits}f}..{hi:,.{digits}f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latency", type=int, default=500)
    parser.add_argument("--kills", type=int, default=10, help="failover kills (0 to skip)")
    parser.add_argument("--warmup", type=int, default=40_000,
                        help="unreported tasks a warm-up round, rounds until the broker's JIT settles (0: none)")
    parser.add_argument("--scale", type=int, default=0,
                        help="server scale: tasks through 100 simulated workers (0 to skip)")
    args = parser.parse_args()
    rows = []
    with broker() as bootstrap:
        if args.warmup:
            raw.throughput(bootstrap, args.warmup)
            rounds, shares = warm(bootstrap, lambda: throughput(bootstrap, args.warmup, 2))
            rows.append(["warm-up: rounds of --warmup tasks until the broker's JIT settles", "rounds",
                         f"{rounds} (JIT share of the broker's CPU: "
                         f"{', '.join(f'{s:.0%}' for s in shares) or 'not measured'})"])
        raw_tp = [raw.throughput(bootstrap, args.tasks) for _ in range(args.runs)]
        rows.append(["raw Kafka, same hops", "messages/s", fmt(raw_tp)])
        results = {}
        for workers in (1, 2, 4):
            runs = [throughput(bootstrap, args.tasks, workers) for _ in range(args.runs)]
            results[workers] = [r[0] for r in runs]
            rows.append([f"throughput, {workers} worker(s) x 2 slots", "tasks/s", fmt(results[workers])])
            rows.append([f"  the machine's CPU busy meanwhile ({os.cpu_count()} CPUs)", "%",
                         fmt([r[2] for r in runs], scale=100)])
            if workers == 1:
                rows.append(["submit rate alone (plain producer)", "tasks/s", fmt([r[1] for r in runs])])
        with_standby = [throughput(bootstrap, args.tasks, 2, standby=True)[0] for _ in range(args.runs)]
        rows.append(["throughput, 2 workers x 2 slots, a standby server following", "tasks/s",
                     fmt(with_standby)])
        fixed = [throughput(bootstrap, args.tasks, 2, prefetch=2)[0] for _ in range(args.runs)]
        rows.append(["throughput, 2 workers x 2 slots, fixed prefetch 2 (the old default)", "tasks/s",
                     fmt(fixed)])
        server_lines, worker_lines = log_lines(bootstrap, args.tasks)
        rows.append(["log lines per task at info: server / workers", "lines",
                     f"{server_lines:.2f} / {worker_lines:.2f}"])
        best = max(results.values(), key=lambda v: summary(v)[0])
        rows.append(["best throughput / raw Kafka", "ratio",
                     f"{summary(best)[0] / summary(raw_tp)[0]:.2f}"])
        lat = [latency(bootstrap, args.latency) for _ in range(args.runs)]
        lat0 = [latency(bootstrap, args.latency, {"linger.ms": 0}) for _ in range(args.runs)]
        lat_standby = [latency(bootstrap, args.latency, standby=True) for _ in range(args.runs)]
        raw_lat = [raw.latencies(bootstrap, args.latency) for _ in range(args.runs)]
        idle = [idle_latency(bootstrap) for _ in range(args.runs)]
        rows.append(["latency p50 / max, a task sent after 3 s idle (20 tasks)", "ms",
                     f"{fmt([percentile(run, 0.5) for run in idle], scale=1000, digits=1)} /"
                     f" {max(max(run) for run in idle) * 1000:.1f}"])
        raw_idle = [raw.latencies(bootstrap, 20, idle=3.0) for _ in range(args.runs)]
        rows.append(["raw Kafka latency p50, same hops, a message sent after 3 s idle (20)", "ms",
                     fmt([percentile(run, 0.5) for run in raw_idle], scale=1000, digits=1)])
        rings = [wake.ring() for _ in range(args.runs)]
        rows.append(["the machine alone (bench/wake.py): a token through 10 processes, p50 back "
                     "to back / after 3 s idle", "ms",
                     f"{fmt([percentile(b2b, 0.5) for b2b, _ in rings], scale=1000, digits=2)} / "
                     f"{fmt([percentile(after, 0.5) for _, after in rings], scale=1000, digits=2)}"])
        for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
            rows.append([f"latency {name} (sequential, {args.latency} tasks)", "ms",
                         fmt([percentile(run, q) for run in lat], scale=1000, digits=1)])
            rows.append([f"latency {name}, a standby server following", "ms",
                         fmt([percentile(run, q) for run in lat_standby], scale=1000, digits=1)])
            rows.append([f"latency {name}, linger.ms = 0", "ms",
                         fmt([percentile(run, q) for run in lat0], scale=1000, digits=1)])
            rows.append([f"raw Kafka latency {name}, same hops", "ms",
                         fmt([percentile(run, q) for run in raw_lat], scale=1000, digits=1)])
        if args.kills:
            import failover

            restarts, readable = failover.run(bootstrap, Path(failover.tempfile.mkdtemp()), args.kills)
            rows.append(["failover: started elsewhere (kill at 1 s of 5 s)", "s",
                         f"{summary(restarts)[0]:.2f} (p99 {percentile(restarts, 0.99):.2f}, "
                         f"{min(restarts):.2f}..{max(restarts):.2f})"])
            rows.append(["failover: result readable", "s",
                         f"{summary(readable)[0]:.2f} (p99 {percentile(readable, 0.99):.2f})"])
            import takeover

            for sig in (takeover.signal.SIGKILL, takeover.signal.SIGTERM):
                active, readable = takeover.run(bootstrap, Path(takeover.tempfile.mkdtemp()), args.kills, sig)
                name = takeover.signal.Signals(sig).name
                rows.append([f"takeover after {name} of the active: standby active", "s",
                             f"{summary(active)[0]:.2f} (p99 {percentile(active, 0.99):.2f})"])
                rows.append([f"takeover after {name}: a task's result readable", "s",
                             f"{summary(readable)[0]:.2f} (p99 {percentile(readable, 0.99):.2f})"])
        if args.scale:
            import scale

            step = max(1, args.scale // 10)
            points = scale.steps(bootstrap, 100, args.scale, step)
            rows.append([f"server scale: grants/s with 100 simulated workers, per {step:,}-task step",
                         "tasks/s", fmt([p.rate for p in points])])
            rows.append(["server scale: the server's CPU a task; its busiest thread's share of a core",
                         "µs; %", f"{fmt([p.cpu_us for p in points])};"
                         f" {fmt([p.loop_share for p in points], scale=100)}"])
            rows.append([f"server scale: database after {args.scale:,} tasks", "MiB", f"{points[-1].db_mib:,.1f}"])
            rows.append([f"server scale: server RSS after {points[0].tasks:,} / {args.scale:,} tasks", "MiB",
                         f"{points[0].rss_mib:,.1f} / {points[-1].rss_mib:,.1f}"])
    print(f"\nYADTQ benchmarks on {platform.node()} ({platform.machine()}, Python "
          f"{platform.python_version()}), median of {args.runs} runs (min..max)\n")
    print(tabulate(rows, headers=["figure", "unit", "value"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
