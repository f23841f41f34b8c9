"""Connections to the server's socket: a client keeps one open between calls, replaces one the
server closed, and at the connection cap the server closes the connection idle longest after a
request to make room (never one that has not sent its first request)."""

from __future__ import annotations

import select
import signal
import socket
import threading

import pytest

from tests.cluster import Cluster
from yadtqd.client import Client
from yadtqd.errors import RequestError

pytestmark = pytest.mark.kafka


def _kept(client: Client) -> list[socket.socket]:
    return [sock for sock, _ in client._kept]


def test_a_client_keeps_its_connection_and_replaces_one_the_server_closed(cluster: Cluster) -> None:
    cluster.write_config(server={"idle_timeout": 2.0})
    cluster.start_server()
    with Client(cluster.socket, timeout=30) as client:
        client.stats()
        [first] = _kept(client)
        assert client.status("nobody")["nobody"]["status"] == "unknown"
        assert _kept(client) == [first]  # the same connection served the second call
        readable, _, _ = select.select([first], [], [], 30)  # the server's idle timeout closes it
        assert readable and first.recv(1) == b""
        assert client.status("nobody")["nobody"]["status"] == "unknown"
        assert _kept(client) != [first] and first.fileno() == -1  # replaced, and closed


def _closed(sock: socket.socket, wait: float = 0.0) -> bool:
    """Whether the server closed this (idle) connection (within ``wait`` seconds: a connection
    chosen while its reply was going out is closed by its thread once the reply is out)."""
    readable, _, _ = select.select([sock], [], [], wait)
    return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""


def test_at_the_cap_the_longest_idle_connection_makes_room(cluster: Cluster) -> None:
    """Two slots; the cluster's own client holds one, idle since it saw the server active."""
    cluster.write_config(server={"max_connections": 2, "idle_timeout": 60.0})
    cluster.start_server()
    [oldest] = _kept(cluster.client)
    first, second, third = (Client(cluster.socket, timeout=30) for _ in range(3))
    try:
        first.stats()  # the second slot
        second.stats()  # at the cap: the oldest idle connection (the cluster's) made room
        assert _closed(oldest, wait=30) and not _closed(_kept(first)[0])
        third.stats()  # again: first's made room, not second's (asked later)
        assert _closed(_kept(first)[0], wait=30) and not _closed(_kept(second)[0])
        assert first.stats()["server"]["role"] == "active"  # first connects anew: second's goes
        assert _closed(_kept(second)[0], wait=30) and not _closed(_kept(third)[0])
    finally:
        for client in (first, second, third):
            client.close()


def test_at_the_cap_a_connection_yet_to_ask_is_never_closed_for_room(cluster: Cluster) -> None:
    cluster.write_config(server={"max_connections": 2, "idle_timeout": 60.0})
    cluster.start_server()  # the cluster's client holds one slot, idle
    silent = [socket.socket(socket.AF_UNIX) for _ in range(2)]
    try:
        for sock in silent:  # the second one takes the slot of the cluster's idle connection
            sock.connect(cluster.socket)
        with Client(cluster.socket, timeout=30) as newcomer:
            with pytest.raises(RequestError) as refused:
                newcomer.stats()
        assert refused.value.code == "busy"
        assert select.select(silent, [], [], 0)[0] == []  # neither answered nor closed
    finally:
        for sock in silent:
            sock.close()
    cluster.wait_for(cluster.client.stats, "the socket to serve again once they left")


def test_a_result_wait_rides_through_a_restart_of_the_server(cluster: Cluster) -> None:
    """The wait's kept connection ends with no reply when the server is killed: the server was
    there, so the client waits through its absence (it does not report it missing) until the
    restarted server answers."""
    cluster.log_level = "debug"  # the server logs each request: the wait's arrival is seen
    cluster.start_server()
    cluster.start_worker("w1")
    with Client(cluster.socket, timeout=30) as client:
        task_id = client.submit("sleep", 5.0)
        outcome: dict[str, object] = {}
        waiter = threading.Thread(target=lambda: outcome.update(view=client.result(task_id, wait=120)))
        waiter.start()
        cluster.wait_for(lambda: "socket request result" in cluster.log("server"), "the wait to arrive")
        assert waiter.is_alive() and cluster.status([task_id])[task_id]["status"] != "success"
        cluster.stop("server", signal.SIGKILL)
        cluster.start_server()
        waiter.join(120)
    view = outcome.get("view")
    assert isinstance(view, dict) and view["status"] == "success", outcome
