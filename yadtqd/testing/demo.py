"""A local YADTQ cluster for a newcomer to watch: broker, server, two workers, sample tasks.

``./dev demo`` runs ``python -m yadtqd.testing.demo start DIR``; ``./dev stop`` runs ``stop``.
Everything lives in DIR: the broker's data and log, the config, the database, the socket and
the daemons' logs. The cluster keeps running after the workload; ``stop`` ends every process
it started, by PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tabulate import tabulate

from yadtqd.client import Client
from yadtqd.errors import YadtqError
from yadtqd.testing.broker import Broker, _stop_dir, wait_gone

WORKLOAD: list[tuple[str, list[Any], dict[str, Any]]] = [
    ("add", [1, 2], {}), ("mul", [6, 7], {}), ("sub", [10, 4], {}), ("div", [1, 0], {}),
    ("sleep", [2], {}), ("sleep", [3], {}), ("cpu", [300000], {}), ("echo", ["hello", "yadtq"], {}),
    ("fail", ["ValueError", "this task fails on purpose"], {}), ("sleep", [10], {"timeout": 1.0}),
    ("flaky", [2, "succeeded on the 2nd attempt"], {"max_retries": 2, "retry_backoff": 0.5}),
    ("add", [40, 2], {}),
]


def start(directory: Path) -> int:
    """Start the cluster in ``directory``, run the workload, leave the cluster running."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "pids.json").exists():
        print("a demo cluster seems to run already; stop it first: ./dev stop", file=sys.stderr)
        return 1
    print("starting the Kafka broker...")
    broker = Broker(directory / "kafka")
    broker.start()
    config = _write_config(directory, broker.bootstrap)
    pids = {"server": _spawn(directory, "server", config, {})}
    socket_path = str(directory / "yadtqd.sock")
    client = Client(socket_path)
    _wait(lambda: client.stats() is not None, "the server")
    for worker in ("worker-a", "worker-b"):
        pids[worker] = _spawn(directory, "worker", config, {"YADTQ_WORKER_ID": worker}, name=worker)
    (directory / "pids.json").write_text(json.dumps(pids))
    _wait(lambda: sum(w["state"] == "live" for w in client.workers()) == 2, "two workers")
    workers = [name for name in pids if name != "server"]
    print(f"cluster up: a Kafka broker at {broker.bootstrap}, the server, and the workers"
          f" {' and '.join(workers)}\n")
    _run_workload(client)
    print(f"""
The cluster keeps running. Try (./dev ctl is yadtqctl with this cluster's configuration):
  ./dev ctl monitor                 a live view; submit more tasks from another terminal
  ./dev ctl submit add 2 3 --wait
  ./dev ctl workers
  ./dev ctl tasks --status failed
Logs: {directory}/*.log   Config: {config}
Stop everything: ./dev stop""")
    return 0


def stop(directory: Path) -> int:
    """Stop the daemons and the broker started by :func:`start`."""
    pids_file = directory / "pids.json"
    if pids_file.exists():
        pids = json.loads(pids_file.read_text())
        # the workers first, while the server is there to confirm that they leave
        for group in ([n for n in pids if n != "server"], [n for n in pids if n == "server"]):
            for name in group:
                try:
                    os.killpg(pids[name], signal.SIGTERM)
                    print(f"stopping {name} (pid {pids[name]})")
                except ProcessLookupError:
                    pass
            for name in group:
                wait_gone(pids[name], 30.0)
        pids_file.unlink()
    if (directory / "kafka" / "broker.json").exists():
        _stop_dir(directory / "kafka")
        print("stopped the Kafka broker")
    return 0


def _write_config(directory: Path, bootstrap: str) -> Path:
    config = directory / "yadtq.toml"
    config.write_text(f"""topic_prefix = "demo"
[kafka]
"bootstrap.servers" = "{bootstrap}"
[server]
database = "{directory / 'yadtq.db'}"
socket = "{directory / 'yadtqd.sock'}"
[worker]
slots = 2
""")
    return config


def _spawn(directory: Path, role: str, config: Path, env: dict[str, str], name: str = "") -> int:
    log = (directory / f"{name or role}.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "yadtqd.cli", role, "--config", str(config)],
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc.pid


def _wait(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except YadtqError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}; see the logs in .yadtq-dev/")


def _run_workload(client: Client) -> None:
    ids = [client.submit(task, *args, **options) for task, args, options in WORKLOAD]
    names = {i: f"{t}({', '.join(map(json.dumps, a))})" for i, (t, a, _) in zip(ids, WORKLOAD)}
    print(f"submitted {len(ids)} tasks; their status, once a second:")
    while True:
        statuses = client.status(*ids)
        counts = {s: sum(v["status"] == s for v in statuses.values())
                  for s in ("queued", "processing", "success", "failed")}  # the demo's words
        print("  " + "  ".join(f"{k} {v:2d}" for k, v in counts.items()))
        if counts["queued"] + counts["processing"] == 0:
            break
        time.sleep(1.0)
    rows = [[names[i], v["status"], v["worker"], v["attempt"],
             json.dumps(v["result"]) if v["status"] == "success"
             else f"{v['error']['type']}: {v['error']['message']}"[:60]]
            for i, v in statuses.items()]
    print()
    print(tabulate(rows, headers=["task", "status", "worker", "attempt", "result / error"]))


def main(argv: list[str] | None = None) -> int:
    """``python -m yadtqd.testing.demo start|stop DIR``."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2 or args[0] not in ("start", "stop"):
        print("usage: python -m yadtqd.testing.demo start|stop DIR", file=sys.stderr)
        return 2
    return start(Path(args[1])) if args[0] == "start" else stop(Path(args[1]))


if __name__ == "__main__":
    sys.exit(main())
