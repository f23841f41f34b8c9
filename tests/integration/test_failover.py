"""Two servers, one active (DESIGN 13, issue 13): the servers' group elects, the changelog keeps
a standby's replica, and a takeover fences the old active. Real broker, real daemons, the
ledger plugin checking that every task ran once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import ledger
from tests.cluster import Cluster, read_topic
from tests.netns import Netns
from yadtqd.client import Client

pytestmark = pytest.mark.kafka


def _role(client: Client) -> str:
    return str(client.stats()["server"]["role"])


def _two_servers(cluster: Cluster, wrap: Callable[[list[str]], list[str]] | None = None) -> Client:
    """The first server active (run through ``wrap``), a second standing by, three workers."""
    cluster.write_config(worker={"slots": 2})
    cluster.start_server(wrap)
    cluster.wait_for(lambda: _role(cluster.client) == "active", "the first server to be elected")
    standby = cluster.start_standby("server2")
    assert _role(standby) == "standby"
    for worker in ("w1", "w2", "w3"):
        cluster.start_worker(worker)
    return standby


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_standby_takes_over_and_every_task_runs_once(cluster: Cluster, tmp_path: Path, sig: int) -> None:
    standby = _two_servers(cluster)
    book = tmp_path / "ledger"
    ids = [cluster.client.submit("ledger", str(book), 0.01, i) for i in range(1000)]
    cluster.wait_for(lambda: sum(v["status"] == "success" for v in cluster.status(ids).values()) >= 100,
                     "tasks to flow")
    stopped = time.monotonic()
    cluster.stop("server", sig)
    cluster.client = standby
    cluster.wait_for(lambda: _role(standby) == "active", "the standby to take over")
    print(f"{signal.Signals(sig).name}: the standby was active {time.monotonic() - stopped:.1f} s later")
    statuses = cluster.wait_terminal(ids, timeout=300)
    assert all(v["status"] == "success" for v in statuses.values())
    verdict = ledger.check_contract(cluster, book, {t: i for i, t in enumerate(ids)})
    assert verdict.re_executions == 0 and cluster.client.failures() == []  # no worker died
    assert "active: took over" in cluster.log("server2")
    server = standby.stats()["server"]
    assert server["active"]["server"] == "server2"
    takeover = server["last_takeover"]
    assert (takeover["server"], takeover["from"]) == ("server2", "server")
    assert takeover["why"] == ("stopped (SIGTERM)" if sig == signal.SIGTERM else
                               "ended without stepping down (killed, frozen or cut off from the broker)")


def test_a_standby_serves_reads_and_forwards_submits(cluster: Cluster) -> None:
    standby = _two_servers(cluster)
    done = cluster.client.submit("add", 2, 3)
    assert standby.result(done, wait=60)["result"] == 5  # the replica has it
    forwarded = standby.submit("add", 40, 2)
    assert cluster.client.result(forwarded, wait=60)["result"] == 42
    assert standby.result(forwarded, wait=60)["result"] == 42
    assert "forwarded to the active server" in cluster.log("server2")
    cluster.wait_for(lambda: (standby.stats()["server"]["lag"], standby.stats()["server"]["lag_seconds"])
                     == (0, 0.0), "the standby to catch up, in records and in seconds")
    assert standby.stats()["server"]["active"]["server"] == "server"  # from the replicated terms
    # the active shows the standby's own report of its lag, and so do the operator's commands
    cluster.wait_for(lambda: [(s["server"], s["lag"]) for s in cluster.client.stats()["server"]["standbys"]]
                     == [("server2", 0)], "the active to hear the standby caught up")
    stats = cluster.ctl("stats").stdout
    assert "this server: server, active" in stats and "standby server2 on " in stats
    assert "last takeover: " in stats and "server in " in stats  # the first term: from nobody
    workers = cluster.ctl("workers").stdout
    assert "w1" in workers and "active server: server on " in workers
    cluster.wait_for(lambda: "this server: server2, standby, lag 0 records (0 s)" in subprocess.run(
        [sys.executable, "-m", "yadtqd.ctl.main", "--socket", standby.socket_path, "stats"],
        capture_output=True, text=True, timeout=60).stdout, "the standby's stats to say it is caught up")


def test_a_frozen_active_is_replaced_and_steps_down_when_it_wakes(cluster: Cluster, tmp_path: Path) -> None:
    """SIGSTOP of the active past the session timeout while tasks flow: a standby takes over
    and fences it; woken, the old active sends nothing a worker acts on, and stands by."""
    standby = _two_servers(cluster)
    first = cluster.client
    book = tmp_path / "ledger"
    ids = [first.submit("ledger", str(book), 0.01, i) for i in range(1000)]
    cluster.wait_for(lambda: sum(v["status"] == "success" for v in cluster.status(ids).values()) >= 100,
                     "tasks to flow")
    frozen = cluster.processes["server"].pid
    os.kill(frozen, signal.SIGSTOP)
    try:
        cluster.client = standby
        cluster.wait_for(lambda: _role(standby) == "active", "the standby to take over")
    finally:
        os.kill(frozen, signal.SIGCONT)
    cluster.wait_for(lambda: _role(first) == "standby", "the old active to stand by")
    statuses = cluster.wait_terminal(ids, timeout=300)
    assert all(v["status"] == "success" for v in statuses.values())
    verdict = ledger.check_contract(cluster, book, {t: i for i, t in enumerate(ids)})
    assert verdict.re_executions == 0 and cluster.client.failures() == []
    assert "no longer active" in cluster.log("server") or "stepping down" in cluster.log("server")


def test_an_active_cut_off_from_the_broker_is_replaced_and_stands_by_once_back(
        cluster: Cluster, netns: Netns, tmp_path: Path) -> None:
    """The active in its own network namespace, cut off while tasks flow: a standby takes over;
    the cut-off server grants nothing a worker acts on, and stands by once reconnected."""
    standby = _two_servers(cluster, wrap=netns.wrap)
    first = cluster.client  # its Unix socket still answers: only the network is cut
    book = tmp_path / "ledger"
    ids = [first.submit("ledger", str(book), 0.01, i) for i in range(1000)]
    cluster.wait_for(lambda: sum(v["status"] == "success" for v in cluster.status(ids).values()) >= 100,
                     "tasks to flow")
    netns.cut()
    try:
        cluster.client = standby
        cluster.wait_for(lambda: _role(standby) == "active", "the standby to take over")
        cluster.wait_for(lambda: _role(first) == "standby", "the cut-off server to stand down by itself")
    finally:
        netns.heal()
    statuses = cluster.wait_terminal(ids, timeout=300)
    assert all(v["status"] == "success" for v in statuses.values())
    verdict = ledger.check_contract(cluster, book, {t: i for i, t in enumerate(ids)})
    assert verdict.re_executions == 0 and cluster.client.failures() == []
    takeover = standby.stats()["server"]["last_takeover"]
    assert (takeover["server"], takeover["from"]) == ("server2", "server")
    cluster.wait_for(lambda: first.stats()["server"]["lag"] == 0, "the old active to follow the new one")
    assert _role(first) == "standby"
    assert "no longer active" in cluster.log("server")


def test_a_standbys_replica_equals_the_actives_rows(cluster: Cluster, tmp_path: Path) -> None:
    standby = _two_servers(cluster)  # (offsets left out: the active's own markers move them)
    ids = [cluster.client.submit("add", i, i) for i in range(50)]
    ids.append(cluster.client.submit("fail", "ValueError", "no"))
    cluster.wait_terminal(ids)
    for worker in ("w1", "w2", "w3"):
        cluster.stop(worker)
    cluster.wait_for(lambda: all(w["state"] == "left" for w in standby.workers())
                     and standby.stats()["server"]["lag"] == 0, "the standby to see every worker leave")
    assert _role(standby) == "standby"  # its rows are its replica's, not a takeover's
    tables = {"tasks": "seq", "workers": "epoch", "failures": "seq", "counters": "name"}
    first, second = (sqlite3.connect(path) for path in (cluster.database, str(cluster.dir / "server2.db")))
    for table, order in tables.items():
        query = f"SELECT * FROM {table} ORDER BY {order}"
        assert first.execute(query).fetchall() == second.execute(query).fetchall(), table
    # the transactions opened ahead of need left placeholders on both topics; every reader
    # skipped them: the counters above (bad_messages) are equal, and no worker complained
    changelog = read_topic(cluster.bootstrap, f"{cluster.prefix}.changelog")
    dispatch = read_topic(cluster.bootstrap, f"{cluster.prefix}.dispatch")
    assert any(key == b"prime" for key, _ in changelog)
    assert any(value is not None and b'"type":"prime"' in value for _, value in dispatch)
    assert second.execute("SELECT value FROM counters WHERE name = 'bad_messages'").fetchall() in ([], [(0,)])
    for worker in ("w1", "w2", "w3"):
        assert "skipped dispatch message" not in cluster.log(worker)
