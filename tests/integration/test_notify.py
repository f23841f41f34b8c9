"""sd_notify without systemd: the test binds its own notify socket and checks what the daemons
send and from which PID (DESIGN section 9)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.notify import WATCHDOG_USEC, NotifySocket

pytestmark = pytest.mark.kafka


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_worker_ready_status_watchdog_and_stopping(cluster: Cluster, notify: NotifySocket) -> None:
    cluster.start_server()
    proc = cluster.start_worker("w1", env=notify.env())
    (ready,) = cluster.wait_for(lambda: notify.seen("READY=1"), "READY=1")
    assert "STATUS=worker w1: busy 0/2, waiting 0, done 0, failed 0" in ready[2]
    cluster.client.result(cluster.client.submit("add", 1, 2), wait=60)
    cluster.wait_for(lambda: notify.seen("done 1"), "a STATUS= with the task counted")
    cluster.wait_for(lambda: len(notify.seen("WATCHDOG=1")) >= 3, "three watchdog pings")
    assert proc.send_signal(signal.SIGTERM) is None and proc.wait(60) == 0
    stopping = notify.seen("STOPPING=1")
    assert len(stopping) == 1
    pings = [t for t, _, _ in notify.seen("WATCHDOG=1")]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) < WATCHDOG_USEC / 1e6  # systemd would have killed it otherwise
    assert {pid for _, pid, _ in notify.messages} == {proc.pid}  # NotifyAccess=main holds


def test_wedged_worker_stops_its_watchdog(cluster: Cluster, notify: NotifySocket) -> None:
    cluster.write_config(server={"heartbeat_timeout": 2.0})
    cluster.start_server()
    proc = cluster.start_worker("w1", env={**notify.env(), "YADTQ_TEST_WEDGE_ON_TASK": "echo"})
    cluster.wait_for(lambda: notify.seen("WATCHDOG=1"), "a first watchdog ping")
    cluster.client.submit("echo", 1)
    cluster.wait_for(lambda: "wedging the main loop" in cluster.log("w1"), "the wedge")
    wedged_at = time.monotonic()
    cluster.wait_for(lambda: cluster.client.failures(), "the server to declare it dead")
    cluster.wait_for(lambda: time.monotonic() - wedged_at > WATCHDOG_USEC / 1e6,
                     "a whole watchdog period to pass", timeout=30)
    late = [t for t, _, _ in notify.seen("WATCHDOG=1") if t > wedged_at]
    assert late == []
    os.killpg(proc.pid, signal.SIGKILL)


def test_server_ready_status_and_stopping(cluster: Cluster, notify: NotifySocket) -> None:
    proc = cluster.start("server", "server", env=notify.env())
    (ready,) = cluster.wait_for(lambda: notify.seen("READY=1"), "READY=1", alive=proc)
    assert "STATUS=standby, lag" in ready[2]  # ready to serve reads; not yet elected
    assert os.path.exists(cluster.socket)  # READY=1 only once the socket is up
    cluster.wait_for(lambda: notify.seen("STATUS=active, workers 0, queued 0, running 0"),
                     "a STATUS= saying it is the active", alive=proc)
    cluster.start_worker("w1")
    cluster.wait_for(lambda: notify.seen("STATUS=active, workers 1"), "a STATUS= counting the worker")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert notify.seen("STOPPING=1")
    assert {pid for _, pid, _ in notify.messages} == {proc.pid}
