"""The socket's connection cap (pure logic): which connection is closed to make room, and that a
request read just as its connection is closed so is never served (its client sends it again)."""

from __future__ import annotations

import socket
from typing import Any

from yadtqd.server.sockets import SocketServer, _Served


def _server() -> SocketServer:
    return SocketServer("/nonexistent/yadtqd.sock", None, ":memory:", 1024)  # type: ignore[arg-type]


class _Reader:
    """Returns one line; ``during`` runs as the line arrives (the accept thread meanwhile)."""

    def __init__(self, line: bytes, during: Any = lambda: None) -> None:
        self.line, self.during = line, during

    def readline(self, limit: int) -> bytes:
        self.during()
        return self.line


def test_a_line_read_as_its_connection_is_closed_for_room_is_not_served() -> None:
    server = _server()
    mine, peer = socket.socketpair()
    with mine, peer:
        served = _Served(mine, idle=True, requests=1)  # a first request answered
        server._served.add(served)
        reclaimed: list[bool] = []
        line = server._next_line(served, _Reader(b'{"op": "retry"}\n', lambda: reclaimed.append(server._reclaim())))
        assert reclaimed == [True] and line is None and served.requests == 1
        assert peer.recv(1) == b""  # the client sees the close, and sends its request anew


def test_only_a_connection_idle_after_a_request_is_closed_for_room() -> None:
    server = _server()
    mine, peer = socket.socketpair()
    with mine, peer:
        fresh = _Served(mine)  # connected, its first request on the way
        server._served.add(fresh)
        reclaimed: list[bool] = []
        line = server._next_line(fresh, _Reader(b'{"op": "stats"}\n', lambda: reclaimed.append(server._reclaim())))
        assert reclaimed == [False] and line == b'{"op": "stats"}\n'
        assert fresh.requests == 1 and not fresh.idle and not fresh.waiting


def test_the_connection_idle_longest_makes_room() -> None:
    server = _server()
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        served = [_Served(a, idle=True, last_request=when, requests=1) for (a, _), when in zip(pairs, (5.0, 2.0, 9.0))]
        server._served.update(served)
        assert server._reclaim() and [s.reclaimed for s in served] == [False, True, False]
        assert server._reclaim() and [s.reclaimed for s in served] == [True, True, False]
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_a_connection_chosen_while_its_reply_goes_out_is_closed_after_it() -> None:
    """Its thread is sending the last reply, not waiting: the reply is not cut; the thread
    ends the connection before reading another request."""
    server = _server()
    mine, peer = socket.socketpair()
    with mine, peer:
        served = _Served(mine, idle=True, requests=1)
        server._served.add(served)
        assert server._reclaim() and served.reclaimed
        mine.sendall(b'{"ok": true}\n')  # the reply going out meanwhile arrives whole
        assert peer.recv(100) == b'{"ok": true}\n'
        assert server._next_line(served, _Reader(b'{"op": "stats"}\n')) is None
