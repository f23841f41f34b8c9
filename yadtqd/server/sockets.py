"""The server's Unix stream socket: JSON lines in, JSON lines out (:mod:`yadtqd.protocol`).

The socket file is created with mode 0660 by binding under a tight umask: there is no window in
which it exists with looser permissions (no chmod after bind). Each connection is served by a
thread of its own with a read-only store connection of its own, taken from a few kept open
between connections.

No client can exhaust the server: at most ``max_connections`` are served at once (and one
more, closed for room, while it writes its last answer), and a connection that sends no
request for ``idle_timeout`` seconds is closed (a ``result`` wait or a ``watch`` is not idle:
the server is the one writing). Clients keep a connection open between calls
(:class:`yadtqd.client.Client`), so at the cap the one idle longest (it answered a request and
handles no other) is closed to make room; only when none is idle is the newcomer told ``busy``
and closed. A connection is idle from the moment its answer is handed to the kernel, before
its client can have read it; one still writing its answer is taken only when no other is idle,
one at a time, and its thread closes it once the answer is written. A request that arrives as
a connection closes for room is never served (the client sends it again on a fresh
connection, and it runs once). Stopping closes the idle connections too, and waits a moment for
their threads, so their store connections close before the process ends.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yadtqd import protocol
from yadtqd.errors import ConfigError, UnreachableError
from yadtqd.server.queries import Queries
from yadtqd.store import Store

log = logging.getLogger("yadtqd.server")

CLOSING_CODES = {"bad_request", "too_large", "unknown_op"}
#: Read-only store connections kept open for the next connections.
IDLE_STORES = 8
#: Seconds a stopping server waits for the threads of its connections to end.
STOP_WAIT = 2.0


@dataclass(eq=False)
class _Served:
    """A connection being served: whether its thread waits to read a request, whether it is
    handling one (read and not yet answered: only a connection that answered one and is not
    handling another may be closed to make room), whether it is writing an answer, when it last
    answered, whether the server closed it to make room, and the thread serving it."""

    sock: socket.socket
    reading: bool = False
    handling: bool = False
    writing: bool = False
    answered_at: float = 0.0
    reclaimed: bool = False
    requests: int = 0
    thread: threading.Thread | None = None


class SocketServer:
    """Accepts connections on a thread; serves each on a thread."""

    def __init__(self, path: str, queries: Queries, db_path: str, max_line: int,
                 max_connections: int = 64, idle_timeout: float = 30.0, group: str = "") -> None:
        self.path = path
        self.group = group
        self.queries = queries
        self.db_path = db_path
        self.max_line = max_line
        self.idle_timeout = idle_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        self.listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._idle: list[Store] = []
        self._idle_lock = threading.Lock()
        self._served: set[_Served] = set()
        self._served_lock = threading.Lock()

    def start(self) -> None:
        """Bind (mode 0660), listen and start accepting."""
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o117)
        try:
            listener.bind(self.path)
        except OSError as exc:
            raise UnreachableError(f"cannot bind socket {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        if self.group:
            self._give_to_group(listener)
        listener.listen(128)
        self.listener = listener
        threading.Thread(target=self._accept, name="yadtq-socket", daemon=True).start()

    def _give_to_group(self, listener: socket.socket) -> None:
        """The socket's group, before anyone may connect (``listen`` comes after): its mode
        was 0660 from the start, so the only change is who the group is."""
        try:
            gid = grp.getgrnam(self.group).gr_gid
            os.chown(self.path, -1, gid)
        except (KeyError, OSError) as exc:
            listener.close()
            os.unlink(self.path)
            why = "no such group" if isinstance(exc, KeyError) else exc.strerror
            raise ConfigError(f"[server] socket_group {self.group}: cannot give {self.path} to it:"
                              f" {why} (the daemon must be a member: SupplementaryGroups=)") from None

    def close(self) -> None:
        """Stop accepting, remove the socket file, close the idle connections and wait a
        moment (:data:`STOP_WAIT`) for the threads of all to end."""
        self._stopping.set()
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with self._served_lock:  # a thread waiting to read stops; one serving, after its reply
            served = list(self._served)
            reading = [each for each in served if each.reading]
        for each in reading:
            with contextlib.suppress(OSError):
                each.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + STOP_WAIT
        for each in served:
            if each.thread is not None:
                each.thread.join(max(0.0, deadline - time.monotonic()))
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for store in idle:
            store.close()

    def _remove_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"[server] socket {self.path} exists and is not a socket: refusing"
                              " to remove it (does the setting name another file?)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)  # left by a server that died; nobody listens
            return
        finally:
            probe.close()
        raise UnreachableError(f"another server is already listening on {self.path}")

    def _accept(self) -> None:
        assert self.listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False) and not self._reclaim():
                self._refuse(conn)
                continue
            threading.Thread(target=self._serve_counted, args=(conn,), name="yadtq-conn",
                             daemon=True).start()

    def _reclaim(self) -> bool:
        """At the cap: close the connection idle longest (it answered a request and handles
        none); its slot passes to the newcomer. False when none is idle. One whose answer is
        still being written is taken only when no other is idle, and is closed by its own
        thread once the answer is written; and only while no other taken so is still writing
        (a client that never reads its answers would otherwise keep a thread and a store
        connection past the cap for each newcomer, until ``idle_timeout``: at most one here)."""
        with self._served_lock:
            idle = [s for s in self._served if s.requests and not s.handling and not s.reclaimed]
            waiting = [s for s in idle if not s.writing]
            if not idle or not waiting and any(s.reclaimed and s.writing for s in self._served):
                return False
            victim = min(waiting or idle, key=lambda s: s.answered_at)
            victim.reclaimed = True
            writing = victim.writing
        if writing:
            log.debug("socket: a connection writing its answer closes when it is written, to make"
                      " room")
            return True
        with contextlib.suppress(OSError):
            victim.sock.shutdown(socket.SHUT_RDWR)  # wakes its thread, which serves nothing more
        log.debug("socket: closed a connection idle for %.1f s to make room",
                  time.monotonic() - victim.answered_at)
        return True

    def _refuse(self, conn: socket.socket) -> None:
        """Over the connection cap: say so and close (never blocking the accepting thread)."""
        with conn:
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.send(protocol.encode(protocol.error(
                    "busy", f"the server is serving {self.max_connections} connections already;"
                    " try again")))
        log.warning("socket connection refused: %d connections open already",
                    self.max_connections, extra={"event": "socket_busy"})

    def _serve_counted(self, conn: socket.socket) -> None:
        served = _Served(conn, thread=threading.current_thread())
        with self._served_lock:
            self._served.add(served)
        try:
            self._serve(served)
        finally:
            with self._served_lock:
                self._served.discard(served)
            if not served.reclaimed:  # else its slot went to the connection it made room for
                self._slots.release()

    def _next_line(self, served: _Served, reader: Any) -> bytes | None:
        """The next request line; None when the connection ended, the server stops, or the
        connection was closed to make room (then even a line read meanwhile is not served:
        its client sends it again)."""
        with self._served_lock:
            if served.reclaimed or self._stopping.is_set():
                return None
            served.reading = True
        line: bytes = reader.readline(self.max_line + 1)
        with self._served_lock:
            served.reading = False
            if served.reclaimed or self._stopping.is_set() or not line:
                return None
            served.requests += 1
            served.handling = True
        return line

    def _answer(self, served: _Served, reply: dict[str, Any]) -> bool:
        """Write an answer; the connection is idle from now on (it may be closed to make room,
        and then is, once the answer is written: False)."""
        with self._served_lock:
            served.answered_at = time.monotonic()
            served.handling, served.writing = False, True
        try:
            served.sock.sendall(protocol.encode(reply))
        finally:
            with self._served_lock:
                served.writing = False
                reclaimed = served.reclaimed
        return not reclaimed

    def _take_store(self) -> Store:
        with self._idle_lock:
            if self._idle:
                return self._idle.pop()
        return Store(self.db_path, readonly=True)

    def _give_back(self, store: Store) -> None:
        if store.db.in_transaction:
            store.db.execute("ROLLBACK")  # a read left open would pin the WAL
        with self._idle_lock:
            if len(self._idle) < IDLE_STORES and not self._stopping.is_set():
                self._idle.append(store)
                return
        store.close()

    def _serve(self, served: _Served) -> None:
        conn = served.sock
        try:
            store = self._take_store()
        except Exception as exc:  # out of open files, the database gone: say so, never hang
            log.error("socket connection answered 'unavailable': cannot open the database: %s", exc,
                      extra={"event": "socket_unavailable"})
            with conn, contextlib.suppress(OSError):
                conn.settimeout(1.0)
                conn.sendall(protocol.encode(protocol.error(
                    "unavailable", f"the server cannot open its database for this connection"
                    f" ({type(exc).__name__}: {exc}); try again")))
                self._close_gently(conn)
            return
        conn.settimeout(self.idle_timeout)
        uid = _peer_uid(conn)
        try:
            with conn, conn.makefile("rb") as reader:
                while not self._stopping.is_set():
                    line = self._next_line(served, reader)
                    if line is None:
                        return
                    reply = self._reply(store, line, uid)
                    if reply.get("watch"):
                        self.queries.watch(store, reply["request"],
                                           lambda snap: conn.sendall(protocol.encode(snap)))
                        return
                    if not self._answer(served, reply):
                        return
                    if not reply["ok"] and reply["error"]["code"] in CLOSING_CODES:
                        self._close_gently(conn)
                        return
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        except Exception:
            log.exception("socket connection failed")
        finally:
            self._give_back(store)

    def _close_gently(self, conn: socket.socket) -> None:
        """End the connection so the client still reads the error reply: closing with unread
        input would reset the connection and lose the reply."""
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(1.0)
        budget = 16 * self.max_line
        with contextlib.suppress(OSError):
            while budget > 0 and (chunk := conn.recv(65536)):
                budget -= len(chunk)

    def _reply(self, store: Store, line: bytes, uid: int) -> dict[str, Any]:
        if len(line) > self.max_line or not line.endswith(b"\n") and len(line) == self.max_line + 1:
            return protocol.error("too_large", f"request line over {self.max_line} bytes")
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return protocol.error("bad_request", f"request is not JSON: {exc}")
        if not isinstance(request, dict):
            return protocol.error("bad_request", "request must be a JSON object with an 'op'")
        if request.get("op") == "watch":
            return {"ok": True, "watch": True, "request": request}
        try:
            return self.queries.handle(store, request, uid)
        except Exception as exc:
            log.exception("request %r failed", request.get("op"))
            return protocol.error("internal", f"{type(exc).__name__}: {exc}")


def _peer_uid(conn: socket.socket) -> int:
    """The connected client's user id (SO_PEERCRED), logged with what it submits; -1 unknown."""
    try:
        _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
        return int(uid)
    except OSError:
        return -1
