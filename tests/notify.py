"""sd_notify without systemd: a datagram socket a test binds and passes to a daemon as
``NOTIFY_SOCKET``, collecting what it sends and from which PID (DESIGN section 9)."""

from __future__ import annotations

import array
import socket
import struct
import threading
import time
from pathlib import Path

#: The watchdog interval a test gives the daemon (``WATCHDOG_USEC``).
WATCHDOG_USEC = 4_000_000


class NotifySocket:
    """Collects (monotonic time, sender pid, message) from a datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, int, str]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        size = socket.CMSG_SPACE(struct.calcsize("3i"))
        while not self.stop.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, size)
            except TimeoutError:
                continue
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = array.array("i", payload[:12])[0]
            with self.lock:
                self.messages.append((time.monotonic(), pid, data.decode()))

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}

    def seen(self, text: str) -> list[tuple[float, int, str]]:
        with self.lock:
            return [m for m in self.messages if text in m[2]]

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()
