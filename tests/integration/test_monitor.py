"""``yadtqctl monitor`` in a real terminal (tmux), and the monitoring outputs checked field by
field against the store."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster

pytestmark = pytest.mark.kafka


class Tmux:
    """A private tmux server with one pane running a command."""

    def __init__(self, command: list[str], width: int = 160, height: int = 60) -> None:
        self.server = f"yadtq-{uuid.uuid4().hex[:8]}"
        self._tmux("new-session", "-d", "-s", "mon", "-x", str(width), "-y", str(height),
                   shlex.join(command))
        self._tmux("set-option", "-t", "mon", "remain-on-exit", "on")

    def _tmux(self, *args: str) -> str:
        # a clean environment: inherited from the test runner, tmux ignores -x/-y and resizes
        env = {"PATH": os.environ["PATH"], "TERM": "xterm-256color", "HOME": os.environ.get("HOME", "/")}
        return subprocess.run(["tmux", "-L", self.server, *args], check=True, capture_output=True,
                              text=True, env=env).stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "mon")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "mon", *keys)

    def resize(self, width: int, height: int) -> None:
        self._tmux("resize-window", "-t", "mon", "-x", str(width), "-y", str(height))

    def dead(self) -> bool:
        return self._tmux("display-message", "-p", "-t", "mon", "#{pane_dead}").strip() == "1"

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True)


@pytest.fixture
def fast(cluster: Cluster) -> Cluster:
    cluster.write_config(server={"heartbeat_timeout": 2.0},
                         worker={"heartbeat_interval": 0.25, "slots": 1, "prefetch": 0})
    return cluster


@pytest.fixture
def tmux(fast: Cluster) -> Iterator[Tmux]:
    fast.start_server()
    pane = Tmux([sys.executable, "-m", "yadtqd.ctl.main", "--socket", fast.socket, "monitor",
                 "--interval", "0.5"])
    yield pane
    pane.close()


def test_monitor_follows_tasks_workers_and_failures(fast: Cluster, tmux: Tmux, tmp_path: Path) -> None:
    cluster = fast
    see = lambda text: cluster.wait_for(lambda: text in tmux.screen(), f"the monitor to show {text!r}")  # noqa: E731
    see("WORKERS (0 live)")
    cluster.start_worker("arith-only", plugins="arith")
    cluster.start_worker("runner")
    see("WORKERS (2 live)")
    book = tmp_path / "ledger"
    first = cluster.client.submit("ledger", str(book), 2, 1, task_id="first-task")
    second = cluster.client.submit("ledger", str(book), 30, 2, task_id="second-task")
    see("IN PROGRESS (1)")
    see("QUEUED (1, oldest first)")
    assert "first-task" in tmux.screen() and "waiting for a free slot" in tmux.screen()
    cluster.client.result(first, wait=60)
    see("success 1")
    cluster.wait_for(lambda: any(line.split()[:1] == ["runner"] and line.split()[5] == "1"
                                 for line in tmux.screen().splitlines()), "runner's succeeded count 1")
    see("second-task")
    cluster.stop("runner", signal.SIGKILL)
    see("WORKER FAILURES (1)")
    assert "no heartbeat" in tmux.screen()
    del second
    tmux.resize(50, 15)
    cluster.wait_for(lambda: (s := tmux.screen()).startswith("YADTQ monitor") and
                     all(len(line) <= 50 for line in s.splitlines()), "a narrow frame")
    cluster.stop("server")
    see("reconnecting")
    cluster.start_server()
    see("reconnected to the server")
    tmux.keys("C-c")
    cluster.wait_for(tmux.dead, "Ctrl-C to end the monitor")


def _db(cluster: Cluster) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{cluster.database}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    return db


def test_once_and_json_outputs_match_the_store(fast: Cluster, tmp_path: Path) -> None:
    cluster = fast
    cluster.start_server()
    cluster.start_worker("w1")
    cluster.start_worker("only-arith", plugins="arith")
    done = [cluster.client.submit("add", i, i) for i in range(5)]
    cluster.wait_terminal(done)
    cluster.client.result(cluster.client.submit("fail"), wait=60)
    waiting = [cluster.client.submit("nosuchtask", i, queue_anyway=True) for i in range(3)]
    running = cluster.client.submit("sleep", 600)
    cluster.wait_for(lambda: cluster.client.status(running)[running]["status"] == "processing",
                     "a task in progress")
    cluster.stop("only-arith", signal.SIGKILL)
    cluster.wait_for(lambda: cluster.client.failures(), "a failure on record")

    snap = json.loads(cluster.ctl("--json", "monitor", "--once").stdout)
    db = _db(cluster)
    by_status = dict(db.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall())
    assert snap["totals"] == {"queued": by_status.get("queued", 0) + by_status.get("assigned", 0),
                              "processing": by_status.get("processing", 0),
                              "success": by_status["success"], "failed": by_status["failed"],
                              "scheduled": by_status.get("scheduled", 0),
                              "cancelled": by_status.get("cancelled", 0),
                              "submitted": sum(by_status.values())}
    queued_ids = [r[0] for r in db.execute("SELECT id FROM tasks WHERE status='queued' ORDER BY seq")]
    assert [t["task-id"] for t in snap["queued"]["tasks"]] == queued_ids == waiting
    assert all(t["waiting"] == "no live worker provides task 'nosuchtask'" for t in snap["queued"]["tasks"])
    workers = {r["epoch"]: r for r in db.execute("SELECT * FROM workers")}

    def held(epoch: str, status: str) -> int:
        return int(db.execute("SELECT count(*) FROM tasks WHERE epoch = ? AND status = ?",
                              (epoch, status)).fetchone()[0])

    def outcomes(epoch: str) -> tuple[int, int]:
        """(succeeded, failed attempts) of an epoch, from the tasks themselves (no retries here)."""
        rows = dict(db.execute("SELECT status, count(*) FROM tasks WHERE epoch = ? AND status IN"
                               " ('success', 'failed') GROUP BY status", (epoch,)).fetchall())
        return rows.get("success", 0), rows.get("failed", 0)

    for w in snap["workers"]:  # every column the monitor shows, against the store
        row = workers[w["epoch"]]
        assert (w["worker"], w["state"], w["slots"], w["pid"]) == \
               (row["worker"], row["state"], row["slots"], row["pid"])
        assert (w["running"], w["granted"]) == (held(w["epoch"], "processing"), held(w["epoch"], "assigned"))
        assert (w["succeeded"], w["failed"]) == outcomes(w["epoch"])
        assert w["executed"] == w["succeeded"] + w["failed"]
        if w["state"] == "dead":
            assert (w["running"], w["granted"]) == (0, 0)
    assert sum(w["running"] for w in snap["workers"]) == snap["running"]["count"] == 1
    (failure,) = snap["failures"]["items"]
    (frow,) = db.execute("SELECT * FROM failures").fetchall()
    assert (failure["worker"], failure["epoch"], failure["reason"], failure["requeued"]) == \
           (frow["worker"], frow["epoch"], frow["reason"], json.loads(frow["requeued"]))

    listed = json.loads(cluster.ctl("--json", "workers").stdout)
    assert {w["epoch"]: w["executed"] for w in listed} == \
           {e: r["succeeded"] + r["failed_runs"] for e, r in workers.items()}
    assert json.loads(cluster.ctl("--json", "failures").stdout) == snap["failures"]["items"]
    failed = json.loads(cluster.ctl("--json", "tasks", "--status", "failed").stdout)
    assert [t["task-id"] for t in failed] == \
           [r[0] for r in db.execute("SELECT id FROM tasks WHERE status='failed' ORDER BY seq DESC")]
    stats = json.loads(cluster.ctl("--json", "stats").stdout)
    assert stats["tasks"] == {k: v for k, v in snap["totals"].items() if k != "submitted" and v}
    table = cluster.ctl("monitor", "--once").stdout
    assert "QUEUED (3, oldest first)" in table and "WORKER FAILURES (1)" in table
    assert json.loads(cluster.ctl("monitor", "--json").stdout)["totals"] == snap["totals"]
    assert json.loads(cluster.ctl("monitor", "--once", "--json").stdout)["totals"] == snap["totals"]
    cluster.stop("w1", signal.SIGKILL)  # its 600 s task need not drain
