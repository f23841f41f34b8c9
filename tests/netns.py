"""A network namespace to cut one worker off the network and reconnect it later.

The worker runs inside the namespace (``ip netns exec``). There, a relay listens on the
namespace's loopback at the broker's own port and forwards to the broker on the host's loopback,
so the broker's advertised address works unchanged. Cutting the namespace's loopback
(``ip link set lo down``) stalls every connection of the worker, as a real network partition does;
bringing it up lets TCP recover. Only loopback addresses inside namespaces the test made are used.

``python -m tests.netns relay NAMESPACE PORT`` runs the relay (started by :class:`Netns`).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import subprocess
import sys
import uuid

CLONE_NEWNET = 0x40000000


class Netns:
    """One namespace with a relay to the broker; remove it with :meth:`delete`."""

    def __init__(self) -> None:
        self.name = f"yadtq-{uuid.uuid4().hex[:8]}"
        self.relay: subprocess.Popen[bytes] | None = None

    def create(self, broker_port: int) -> None:
        """Create the namespace, bring its loopback up, start the relay to the broker."""
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self._ip("link", "set", "lo", "up")
        self.relay = subprocess.Popen([sys.executable, "-m", "tests.netns", "relay", self.name,
                                       str(broker_port)], stdout=subprocess.PIPE)
        assert self.relay.stdout is not None
        assert self.relay.stdout.readline().strip() == b"ready"

    def wrap(self, command: list[str]) -> list[str]:
        """The command, run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *command]

    def cut(self) -> None:
        """Cut everything inside the namespace off."""
        self._ip("link", "set", "lo", "down")

    def heal(self) -> None:
        """Reconnect."""
        self._ip("link", "set", "lo", "up")

    def delete(self) -> None:
        """Stop the relay and remove the namespace."""
        if self.relay is not None:
            self.relay.kill()
            self.relay.wait()
        subprocess.run(["ip", "netns", "delete", self.name], check=False)

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, "ip", *args], check=True)


def _listen_inside(name: str, port: int) -> socket.socket:
    """A listening socket on the namespace's loopback, made from the host namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    host = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the namespace failed")
        listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        if libc.setns(host, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back to the host failed")
    finally:
        os.close(host)
        os.close(target)
    listener.setblocking(False)
    return listener


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _relay(listener: socket.socket, port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, sock=listener)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    """``relay NAMESPACE PORT``."""
    _, name, port = sys.argv[1:4]
    listener = _listen_inside(name, int(port))
    asyncio.run(_relay(listener, int(port)))


if __name__ == "__main__" and sys.argv[1:2] == ["relay"]:
    main()
