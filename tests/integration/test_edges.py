"""Operating at the edges (issue 17, items 5 and 6): paths that would destroy data are refused,
one database has one server, a submit during a broker outage says the task is recorded and names
it, and a wait survives a server restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.cluster import Cluster
from yadtqd.testing.broker import Broker

pytestmark = pytest.mark.kafka


def _server(cluster: Cluster, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a server that is expected to refuse to start."""
    return subprocess.run([sys.executable, "-m", "yadtqd.cli", "server", "--config", str(cluster.config)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_a_socket_path_naming_another_file_is_refused_and_the_file_kept(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.stop("server")
    cluster.write_config(server={"socket": cluster.database})  # the live database, say
    size = os.path.getsize(cluster.database)
    done = _server(cluster)
    assert done.returncode == 78
    assert "exists and is not a socket: refusing to remove it" in done.stderr
    assert os.path.getsize(cluster.database) == size


@pytest.mark.parametrize("key", ["DATABASE", "SOCKET"])
def test_an_empty_database_or_socket_is_a_config_error(cluster: Cluster, key: str) -> None:
    done = _server(cluster, {f"YADTQ_SERVER_{key}": ""})
    assert done.returncode == 78 and f"YADTQ_SERVER_{key}: must not be empty" in done.stderr


def test_a_socket_group_that_cannot_be_given_is_a_config_error(cluster: Cluster) -> None:
    done = _server(cluster, {"YADTQ_SERVER_SOCKET_GROUP": "no-such-group-here"})
    assert done.returncode == 78
    assert "[server] socket_group no-such-group-here: cannot give" in done.stderr
    assert "no such group" in done.stderr and not os.path.exists(cluster.socket)


def test_a_second_server_on_the_same_database_refuses_at_once(cluster: Cluster) -> None:
    first = cluster.start_server()
    cluster.start_worker("w1")
    done = _server(cluster, {"YADTQ_SERVER_SOCKET": str(cluster.dir / "second.sock")})
    assert done.returncode == 78
    assert f"is in use by another server (pid {first.pid})" in done.stderr
    assert "re-sent" not in done.stderr and "ready" not in done.stderr
    assert cluster.client.result(cluster.client.submit("add", 1, 1), wait=60)["result"] == 2


def test_a_submit_during_a_broker_outage_names_the_recorded_task(own_cluster: Cluster,
                                                                  own_broker: Broker) -> None:
    cluster = own_cluster
    cluster.start_server()
    cluster.start_worker("w1")
    own_broker.stop()
    done = cluster.ctl("submit", "add", "2", "3", "--id", "during-outage")
    assert done.returncode == 3, done.stderr
    assert "Kafka did not accept task during-outage" in done.stderr
    assert "recorded as queued and will run" in done.stderr
    own_broker.start()
    assert cluster.client.result("during-outage", wait=120)["result"] == 5
    again = cluster.ctl("submit", "add", "2", "3", "--id", "during-outage")  # retry: a no-op
    assert again.returncode == 0
    assert cluster.client.stats()["tasks"] == {"success": 1}


def test_a_wait_survives_a_server_restart(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_worker("w1")
    task_id = cluster.client.submit("sleep", 3)
    waiting = subprocess.Popen([sys.executable, "-m", "yadtqd.ctl.main", "--socket", cluster.socket,
                                "result", task_id, "--wait", "120"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    cluster.wait_for(lambda: "socket request result from uid" in cluster.log("server"),
                     "the wait to reach the server")  # then the server goes away under it
    cluster.stop("server", signal.SIGKILL)
    cluster.start_server()
    out, err = waiting.communicate(timeout=150)
    assert waiting.returncode == 0, err
    assert out.strip() == "3"


def test_a_log_file_that_cannot_be_opened_is_a_config_error(cluster: Cluster) -> None:
    done = _server(cluster, {"YADTQ_LOGGING_FILE": "/nonexistent/yadtq.log"})
    assert done.returncode == 78
    (line,) = done.stderr.strip().splitlines()
    assert "[logging] file /nonexistent/yadtq.log: cannot be opened" in line
