"""The server's Unix stream socket: JSON lines in, JSON lines out (:mod:`yadtqd.protocol`).

The socket file is created with mode 0660 by binding under a tight umask: there is no window in
which it exists with looser permissions (no chmod after bind). Each connection is served by a
thread of its own with a read-only store connection of its own, taken from a few kept open
between connections (most clients make one request per connection).

No client can exhaust the server: at most ``max_connections`` are served at once (one more is
told ``busy`` and closed), and a connection that sends no request for ``idle_timeout`` seconds
is closed (a ``result`` wait or a ``watch`` is not idle: the server is the one writing).
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
        """Stop accepting and remove the socket file."""
        self._stopping.set()
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
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
            if not self._slots.acquire(blocking=False):
                self._refuse(conn)
                continue
            threading.Thread(target=self._serve_counted, args=(conn,), name="yadtq-conn",
                             daemon=True).start()

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
        try:
            self._serve(conn)
        finally:
            self._slots.release()

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

    def _serve(self, conn: socket.socket) -> None:
        store = self._take_store()
        conn.settimeout(self.idle_timeout)
        uid = _peer_uid(conn)
        try:
            with conn, conn.makefile("rb") as reader:
                while not self._stopping.is_set():
                    line = reader.readline(self.max_line + 1)
                    if not line:
                        return
                    reply = self._reply(store, line, uid)
                    if reply.get("watch"):
                        self.queries.watch(store, reply["request"],
                                           lambda snap: conn.sendall(protocol.encode(snap)))
                        return
                    conn.sendall(protocol.encode(reply))
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
