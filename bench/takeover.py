"""Takeover (DESIGN 13): two servers, two workers; the active SIGKILLed (or SIGTERMed), a task
submitted through the standby's socket right after; the killed server started again as the next
standby, and so on.

    .venv/bin/python bench/takeover.py [--takeovers 10] [--session-timeout 6]

Two figures per takeover, from the moment of the signal: until the standby says it is active
(it fenced the old active and read the changelog to its end), and until the task submitted then
has its result readable (the user's view: a grant from the new active, run, recorded). Prints
each takeover and the median, p99, min and max. Uses ``YADTQ_TEST_BOOTSTRAP`` if set, else
starts a broker of its own.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import broker, percentile, summary  # noqa: E402

from tests.cluster import Cluster  # noqa: E402
from yadtqd.client import Client  # noqa: E402


def run(bootstrap: str, workdir: Path, takeovers: int, sig: int,
        session_timeout: float = 6.0) -> tuple[list[float], list[float]]:
    """(seconds until active, seconds until a task's result is readable) per takeover."""
    cluster = Cluster(bootstrap, workdir)
    cluster.log_level = "info"
    cluster.write_config(server={"session_timeout": session_timeout}, worker={"slots": 2})
    active_at, readable_at = [], []
    try:
        cluster.start_server()
        clients: dict[str, Client] = {"server": cluster.client, "server2": cluster.start_standby("server2")}
        cluster.start_worker("w1")
        cluster.start_worker("w2")
        active, standby = "server", "server2"
        for n in range(takeovers):
            _settle(cluster, clients[active], clients[standby], standby)
            stopped = time.monotonic()
            cluster.stop(active, sig)
            task_id = clients[standby].submit("add", n, 1)  # forwarded while it stands by
            cluster.wait_for(lambda: clients[standby].stats()["server"]["role"] == "active",
                             f"{standby} to take over", timeout=120)
            active_at.append(time.monotonic() - stopped)
            clients[standby].result(task_id, wait=120)
            readable_at.append(time.monotonic() - stopped)
            print(f"{signal.Signals(sig).name} {n + 1:2d}: {standby} active after {active_at[-1]:.2f} s,"
                  f" a task's result readable after {readable_at[-1]:.2f} s", flush=True)
            cluster.client = clients[standby]
            clients[active] = cluster.start_standby(active)
            active, standby = standby, active
    finally:
        cluster.stop_all()
    return active_at, readable_at


def _settle(cluster: Cluster, active: Client, standby: Client, name: str) -> None:
    """Until the active hears the standby caught up: it is following, and in the group."""
    cluster.wait_for(lambda: any(s["server"] == name and s["lag"] == 0 for s in active.stats()["server"]["standbys"])
                     and standby.stats()["server"]["role"] == "standby", f"{name} to stand by, caught up",
                     timeout=120)


def line(name: str, values: list[float]) -> str:
    """Median, p99, min and max."""
    med, lo, hi = summary(values)
    return f"{name}: median {med:.2f} s, p99 {percentile(values, 0.99):.2f} s, {lo:.2f}..{hi:.2f} (n={len(values)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--takeovers", type=int, default=10)
    parser.add_argument("--session-timeout", type=float, default=6.0)
    args = parser.parse_args()
    with broker() as bootstrap:
        figures = {}
        for sig in (signal.SIGKILL, signal.SIGTERM):
            with tempfile.TemporaryDirectory() as tmp:
                figures[sig] = run(bootstrap, Path(tmp), args.takeovers, sig, args.session_timeout)
    for sig, (active, readable) in figures.items():
        name = signal.Signals(sig).name
        print(line(f"{name}: standby active", active))
        print(line(f"{name}: a task's result readable", readable))
    return 0


if __name__ == "__main__":
    sys.exit(main())
