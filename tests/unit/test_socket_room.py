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


def test_a_connection_still_writing_its_answer_makes_room_last_and_one_at_a_time() -> None:
    """Idle means answered and handling nothing, from the moment the answer is handed to the
    kernel (a client that has its answer may find its connection counted idle). One still
    writing is taken only when no other is idle, is not shut down (its answer would be cut:
    its own thread closes it once written), and only while no other taken so still writes."""
    server = _server()
    pairs = [_pair() for _ in range(4)]
    try:
        (a, pa), (b, pb), (c, pc), (d, pd) = pairs
        old_writer = _Served(a, requests=1, answered_at=1.0, writing=True)
        waiting = _Served(b, requests=1, answered_at=5.0)
        handling = _Served(c, requests=2, answered_at=0.5, handling=True)  # a result wait, say
        new_writer = _Served(d, requests=1, answered_at=2.0, writing=True)
        server._served.update([old_writer, waiting, handling, new_writer])
        assert server._reclaim() and waiting.reclaimed  # the one not writing first, though newer
        assert pb.recv(1) == b""
        assert server._reclaim() and old_writer.reclaimed and not new_writer.reclaimed
        pa.setblocking(False)
        try:
            pa.recv(1)
            raise AssertionError("a connection still writing its answer was shut down")
        except BlockingIOError:
            pass
        assert not server._reclaim()  # the taken writer still writes: no second one
        old_writer.writing = False  # its answer written (its thread then closes it)
        assert server._reclaim() and new_writer.reclaimed
        assert not handling.reclaimed and not server._reclaim()
    finally:
        for one, other in pairs:
            one.close()
            other.close()


def test_an_answer_written_after_its_connection_made_room_is_whole_then_the_thread_ends() -> None:
    server = _server()
    mine, peer = _pair()
    with mine, peer:

        class TakenWhileWriting:
            """The accept thread takes the connection for room while its answer is written."""

            def sendall(self, data: bytes) -> None:
                assert server._reclaim()
                mine.sendall(data)

        served = _Served(TakenWhileWriting(), requests=1, handling=True)  # type: ignore[arg-type]
        server._served.add(served)
        assert server._answer(served, {"ok": True, "n": 1}) is False  # its thread ends
        assert served.reclaimed and not served.writing and not served.handling
        assert peer.recv(1024) == b'{"ok":true,"n":1}\n'  # whole: it was not shut down


def test_a_connection_whose_store_cannot_be_opened_gets_an_error_not_silence(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Out of open files, or the database gone: the client is told so and the connection closed
    (the thread used to die with the connection open, and a client without a timeout hung)."""
    server = SocketServer("/nonexistent/yadtqd.sock", None, str(tmp_path / "none" / "yadtq.db"),  # type: ignore[arg-type]
                          1024)
    mine, peer = _pair()
    with peer:
        peer.sendall(b'{"op": "stats"}\n')
        peer.shutdown(socket.SHUT_WR)  # all it sends
        assert server._slots.acquire(blocking=False)  # as the accepting thread does
        server._serve_counted(mine)
        reply = peer.makefile("rb").readline()
        assert b'"code":"unavailable"' in reply.replace(b" ", b"") and b"cannot open its database" in reply
        assert peer.recv(1) == b""  # closed
    assert mine.fileno() == -1
