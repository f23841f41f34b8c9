"""The machine's own cost of waking after an idle spell, with no Kafka and no YADTQ: a token
passed through a ring of processes over pipes, each doing a little Python work, timed back to
back and after ``idle`` seconds in which nothing ran.

A task after an idle spell wakes a dozen threads and processes in turn (client, socket thread,
loop, librdkafka's threads, the broker's, the worker's loop, its execution process, and back).
Measured on the CI machine kind (a VM), each wake-up after an idle costs more than the same
wake-up back to back, and more the longer the idle: through 10 processes, 0.25 ms back to
back, 0.62 after 10 ms idle, 1.14 after 200 ms, 1.70 after 3 s. This figure, reported beside
the idle task's latency in ``bench/run.py``, tells what of an idle task's extra time the
machine charges every program.

    .venv/bin/python bench/wake.py [--hops 10] [--count 20] [--idle 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import percentile  # noqa: E402

#: One hop: read the token, do a little work (as a hop does), pass it on.
HOP = """
import os, sys
r, w = int(sys.argv[1]), int(sys.argv[2])
while True:
    b = os.read(r, 64)
    if not b:
        break
    work = {"k": [x * 2 for x in range(200)]}
    os.write(w, b)
"""


def ring(hops: int = 10, count: int = 20, idle: float = 3.0, back_to_back: int = 300
         ) -> tuple[list[float], list[float]]:
    """(seconds a trip back to back, seconds a trip after ``idle`` seconds) through ``hops``
    processes, ``back_to_back`` and ``count`` trips."""
    pipes = [os.pipe() for _ in range(hops + 1)]
    procs = [subprocess.Popen([sys.executable, "-c", HOP, str(pipes[i][0]), str(pipes[i + 1][1])],
                              pass_fds=(pipes[i][0], pipes[i + 1][1])) for i in range(hops)]
    first, last = pipes[0][1], pipes[hops][0]
    for i in range(hops + 1):  # each end now lives in the process that uses it
        if i > 0:
            os.close(pipes[i][1])
        if i < hops:
            os.close(pipes[i][0])

    def trip() -> float:
        start = time.perf_counter()
        os.write(first, b"t")
        os.read(last, 64)
        return time.perf_counter() - start

    try:
        for _ in range(100):
            trip()  # the processes started and their code warm
        warm = [trip() for _ in range(back_to_back)]
        after_idle = []
        for _ in range(count):
            time.sleep(idle)  # the point: a machine left idle, not a wait for an event
            after_idle.append(trip())
        return warm, after_idle
    finally:
        os.close(first)
        for proc in procs:
            proc.wait()
        os.close(last)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=10)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--idle", type=float, default=3.0)
    args = parser.parse_args()
    warm, after_idle = ring(args.hops, args.count, args.idle)
    print(f"a token through {args.hops} processes: p50 {percentile(warm, 0.5) * 1000:.2f} ms back "
          f"to back, {percentile(after_idle, 0.5) * 1000:.2f} ms after {args.idle:g} s idle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
