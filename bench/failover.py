"""Failover: a worker SIGKILLed 1 s into a 5 s task -> the task started elsewhere -> its result
readable. Default settings (heartbeat_timeout 5 s, heartbeat_interval 1 s).

    .venv/bin/python bench/failover.py [--kills 10]

Uses ``YADTQ_TEST_BOOTSTRAP`` if set, else starts a broker of its own. Prints each kill and the
median, p99, min and max of both intervals, measured from the moment of the kill.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster import Cluster  # noqa: E402
from yadtqd.testing.broker import Broker  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(bootstrap: str, workdir: Path, kills: int) -> tuple[list[float], list[float]]:
    cluster = Cluster(bootstrap, workdir)
    cluster.write_config(server={"heartbeat_timeout": 5.0}, worker={"heartbeat_interval": 1.0, "slots": 1})
    restarts, results = [], []
    try:
        cluster.start_server()
        cluster.start_worker("a")
        cluster.start_worker("b")
        for n in range(kills):
            task_id = cluster.client.submit("sleep", 5)
            view = cluster.wait_for(lambda: (v := cluster.client.status(task_id)[task_id])["status"] == "processing" and v,
                                    "the task to start")
            time.sleep(1.0)  # the scenario: the kill comes 1 s into the task
            victim = view["worker"]
            killed_at = time.monotonic()
            cluster.stop(victim, signal.SIGKILL)
            cluster.wait_for(lambda: (v := cluster.client.status(task_id)[task_id])["status"] == "processing"
                             and v["attempt"] == 2, "the task to start elsewhere", timeout=120)
            restarted = time.monotonic() - killed_at
            cluster.client.result(task_id, wait=120)
            readable = time.monotonic() - killed_at
            restarts.append(restarted)
            results.append(readable)
            print(f"kill {n + 1:2d}: {victim} killed; started elsewhere after {restarted:.2f} s,"
                  f" result readable after {readable:.2f} s", flush=True)
            cluster.start_worker(victim)
    finally:
        cluster.stop_all()
    return restarts, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    args = parser.parse_args()
    import os

    with tempfile.TemporaryDirectory() as tmp:
        broker = None
        bootstrap = os.environ.get("YADTQ_TEST_BOOTSTRAP")
        if not bootstrap:
            broker = Broker(Path(tmp) / "kafka")
            broker.start()
            bootstrap = broker.bootstrap
        try:
            (Path(tmp) / "cluster").mkdir()
            restarts, results = run(bootstrap, Path(tmp) / "cluster", args.kills)
        finally:
            if broker:
                broker.stop()
    for name, values in (("started elsewhere", restarts), ("result readable", results)):
        print(f"{name:18s} median {statistics.median(values):.2f} s  p99 {percentile(values, 0.99):.2f} s"
              f"  min {min(values):.2f} s  max {max(values):.2f} s  (n={len(values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
