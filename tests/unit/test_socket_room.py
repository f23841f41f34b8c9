"""The socket's connection cap and stop (pure logic): which connection is closed to make room,
that a request read just as its connection is closed so is never served (its client sends it
again), and that stopping wakes the connections waiting to read."""

from __future__ import annotations

import pickle
import socket
import threading
from collections.abc import Callable

from yadtqd.client import Client
from yadtqd.server.sockets import SocketServer, _Served


def _server() -> SocketServer:
    return SocketServer("/nonexistent/yadtqd.sock", None, ":memory:", 1024)  # type: ignore[arg-type]


def _pair() -> tuple[socket.socket, socket.socket]:
    mine, peer = socket.socketpair()
    mine.settimeout(10)
    peer.settimeout(10)  # a regression fails here rather than hanging
    return mine, peer


class _Reader:
    """Returns one line; ``during`` runs as the line arrives (the accept thread meanwhile)."""

    def __init__(self, line: bytes, during: Callable[[], object] = lambda: None) -> None:
        self.line, self.during = line, during

    def readline(self, limit: int) -> bytes:
        self.during()
        return self.line


def test_a_line_read_as_its_connection_is_closed_for_room_is_not_served() -> None:
    server = _server()
    mine, peer = _pair()
    with mine, peer:
        served = _Served(mine, requests=1)  # a first request answered
        server._served.add(served)
        reclaimed: list[bool] = []
        line = server._next_line(served, _Reader(b'{"op": "stats"}\n', lambda: reclaimed.append(server._reclaim())))
        assert reclaimed == [True] and line is None and served.requests == 1
        assert peer.recv(1) == b""  # the client sees the close, and sends its request anew


def test_only_a_connection_waiting_after_an_answer_is_closed_for_room() -> None:
    server = _server()
    mine, peer = _pair()
    with mine, peer:
        fresh = _Served(mine)  # connected, its first request on the way
        server._served.add(fresh)
        reclaimed: list[bool] = []
        line = server._next_line(fresh, _Reader(b'{"op": "stats"}\n', lambda: reclaimed.append(server._reclaim())))
        assert reclaimed == [False] and line == b'{"op": "stats"}\n'
        assert fresh.requests == 1 and not fresh.reading
        assert not server._reclaim()  # now serving that request (not reading): kept too


def test_the_connection_idle_longest_makes_room() -> None:
    server = _server()
    pairs = [_pair() for _ in range(3)]
    try:
        served = [_Served(a, reading=True, answered_at=when, requests=1)
                  for (a, _), when in zip(pairs, (5.0, 2.0, 9.0))]
        server._served.update(served)
        assert server._reclaim() and [s.reclaimed for s in served] == [False, True, False]
        assert server._reclaim() and [s.reclaimed for s in served] == [True, True, False]
        assert pairs[1][1].recv(1) == b"" and pairs[0][1].recv(1) == b""
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_stopping_wakes_the_connections_waiting_to_read() -> None:
    server = _server()
    mine, peer = _pair()
    with mine, peer:
        ended: list[bytes | None] = []
        thread = threading.Thread(target=lambda: ended.append(
            server._next_line(served, mine.makefile("rb"))))
        served = _Served(mine, thread=thread)  # a connection yet to send anything
        server._served.add(served)
        thread.start()
        peer.sendall(b'{"op": "stats"}\n')
        thread.join(10)  # served: the thread read its line
        assert ended == [b'{"op": "stats"}\n']
        ended.clear()
        thread = served.thread = threading.Thread(target=lambda: ended.append(
            server._next_line(served, mine.makefile("rb"))))
        thread.start()
        while not served.reading:  # the thread is in (or about to be in) its read
            threading.Event().wait(0.001)
        server.close()
        assert not thread.is_alive() and ended == [None]


def test_a_client_pickles_without_its_connections() -> None:
    client = Client("/run/somewhere.sock", timeout=7)
    copy = pickle.loads(pickle.dumps(client))
    assert (copy.socket_path, copy.timeout, copy._kept) == ("/run/somewhere.sock", 7, [])
