"""The Python API for applications.

Over the server's socket (:class:`Client`)::

    from yadtqd.client import Client

    client = Client("/run/yadtq/yadtqd.sock")
    task_id = client.submit("add", 1, 2)
    client.result(task_id, wait=30)   # {"status": "success", "result": 3, ...}

Straight to Kafka, for producers on hosts without the socket (:class:`KafkaSubmitter`)::

    from yadtqd.client import KafkaSubmitter

    with KafkaSubmitter({"bootstrap.servers": "broker:9092"}, topic_prefix="yadtq") as kafka:
        task_id = kafka.submit("add", 1, 2)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

from yadtqd import messages as m
from yadtqd.errors import RequestError, UnreachableError, UsageError, WaitTimeout

DEFAULT_SOCKET = "/run/yadtq/yadtqd.sock"
TERMINAL = ("success", "failed", "cancelled")
#: Seconds between two tries while the server cannot be reached (it may be restarting).
RETRY_PAUSE = 0.5
#: Connections a :class:`Client` keeps open between calls (per process): a call on a kept one
#: costs one round trip, not a connect and a new server thread (0.2 ms against 0.5 here).
KEEP = 2
#: Requests that always go on a connection of their own, never kept nor sent twice: the
#: operator's orders (one the server served before it went away would be done again: a cancel
#: could stop a newer attempt, a retry make one more) and ``watch`` (a stream of replies).
OWN_CONNECTION = frozenset({"cancel", "retry", "purge", "watch"})


class _Stale(Exception):
    """A kept connection the server had closed (its idle timeout, its connection cap, its
    restart) before any of the reply came back; ``sent``: after the request was sent whole
    (the server was there then), rather than refused as it was sent."""

    def __init__(self, sent: bool) -> None:
        super().__init__()
        self.sent = sent


#: Every client of this process, for :func:`_after_fork`.
_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork() -> None:
    """In a forked child: each client forgets its parent's connections (closing the child's
    copies only) and takes a lock of its own (another thread may have held the parent's)."""
    for client in list(_CLIENTS):
        client._lock = threading.Lock()
        client.close()


os.register_at_fork(after_in_child=_after_fork)


def default_socket() -> str:
    """``$YADTQ_SERVER_SOCKET``, else the default socket path."""
    return os.environ.get("YADTQ_SERVER_SOCKET") or DEFAULT_SOCKET


def new_task_id() -> str:
    """A fresh task id: clients generate task ids. A UUID of version 7 (RFC 9562), whose first
    48 bits are the time in milliseconds and the other 74 random: ids made in later
    milliseconds sort after earlier ones, so the server's index of task ids takes each new one
    at its end rather than on a page anywhere (issue 15: the server alone granted 10,114 to
    11,056 tasks/s with these ids against 8,180 to 10,282 with UUID4s; any unique id works)."""
    return str(_uuid7())


def _uuid7() -> uuid.UUID:
    """RFC 9562, section 5.7: 48 bits of Unix time in milliseconds, the version (7), 12 random
    bits, the variant (``10``), 62 random bits. (Python 3.14's ``uuid.uuid7`` has this layout
    and also counts within a millisecond, for an order the index does not need.)"""
    ms = time.time_ns() // 1_000_000 & (1 << 48) - 1
    rand = int.from_bytes(os.urandom(10), "big")  # 80 random bits, 74 of them used
    return uuid.UUID(int=ms << 80 | 0x7 << 76 | (rand >> 68) << 64 | 0b10 << 62 | rand & (1 << 62) - 1)


def submission(task: str, args: tuple[Any, ...] | list[Any], kwargs: Mapping[str, Any] | None = None,
               task_id: str | None = None, timeout: float | None = None,
               max_retries: int | None = None, retry_backoff: float | None = None,
               priority: int = 0, delay: float | None = None, eta: str | dt.datetime | None = None,
               then: Mapping[str, Any] | None = None, limit_key: str | None = None) -> dict[str, Any]:
    """The JSON object of a submission, in the seed's format plus optional fields: ``priority``
    (higher first), ``delay`` (seconds) or ``eta`` (ISO 8601 text, or an aware datetime),
    ``then`` (a follow-up: ``{"task", "args", "kwargs", "options", "then"}``)."""
    body: dict[str, Any] = {"task-id": task_id or new_task_id(), "task": task, "args": list(args)}
    if kwargs:
        body["kwargs"] = dict(kwargs)
    if priority:
        body["priority"] = priority
    if delay is not None:
        body["delay"] = delay
    if eta is not None:
        body["eta"] = eta.isoformat() if isinstance(eta, dt.datetime) else eta
    if then is not None:
        body["then"] = dict(then)
    if limit_key is not None:
        body["limit_key"] = limit_key
    options = {k: v for k, v in (("timeout", timeout), ("max_retries", max_retries),
                                 ("retry_backoff", retry_backoff)) if v is not None}
    if options:
        body["options"] = options
    body["submitted_at"] = time.time()
    return body


class Client:
    """Talks to the server's socket. Up to :data:`KEEP` connections are kept open between calls
    (thread-safe: each call has a connection to itself); one the server closed meanwhile is
    replaced and the request sent again, since the server never serves a request on a
    connection it closes as idle (:mod:`yadtqd.server.sockets`); the operator's orders always
    go on a connection of their own (:data:`OWN_CONNECTION`). :meth:`close` (or ``with``)
    closes them; a forked child or an unpickled copy opens its own."""

    def __init__(self, socket_path: str | None = None, timeout: float = 30.0) -> None:
        self.socket_path = socket_path or default_socket()
        self.timeout = timeout
        self._kept: list[tuple[socket.socket, Any]] = []
        self._lock = threading.Lock()
        _CLIENTS.add(self)

    def __getstate__(self) -> dict[str, Any]:
        return {"socket_path": self.socket_path, "timeout": self.timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["socket_path"], state["timeout"])  # type: ignore[misc]

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the kept connections (a later call opens one again)."""
        with self._lock:
            kept, self._kept = self._kept, []
        for conn in kept:
            self._discard(conn)

    def request(self, request: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one request and return the reply; an error reply raises :class:`RequestError`."""
        data = json.dumps(request).encode() + b"\n"
        own = request.get("op") in OWN_CONNECTION
        line: bytes | None = None
        went_away = False
        kept = None if own else self._take()
        if kept is not None:
            try:
                line, conn = self._exchange(kept, data, timeout, kept=True), kept
            except _Stale as stale:  # closed by the server before it read the request: anew
                went_away = stale.sent
        if line is None:
            try:
                conn = self._connect(timeout)
            except UnreachableError as exc:
                if went_away:  # it was there as the request went out: it is restarting
                    exc.absent = False
                raise
            line = self._exchange(conn, data, timeout)
        if not line.endswith(b"\n"):  # nothing, or half a line: the server went away
            raise UnreachableError(f"the server at {self.socket_path} closed the connection")
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            self._discard(conn)
            raise UnreachableError(f"the server at {self.socket_path} sent a broken reply")
        if not reply.get("ok"):
            self._discard(conn)  # the server may close after an error: never kept
            err = reply.get("error", {})
            raise RequestError(err.get("code", "internal"), err.get("message", "unknown error"))
        if own:
            self._discard(conn)
        else:
            self._keep(conn)
        return reply

    def _connect(self, timeout: float | None) -> tuple[socket.socket, Any]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout or self.timeout)
            sock.connect(self.socket_path)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError):
                raise self._unreachable(exc) from None
            raise
        return sock, sock.makefile("rb")

    def _take(self) -> tuple[socket.socket, Any] | None:
        """A kept connection, if any."""
        with self._lock:
            return self._kept.pop() if self._kept else None

    def _keep(self, conn: tuple[socket.socket, Any]) -> None:
        """Keep a connection that served a request whole, for the next call (or close it)."""
        with self._lock:
            if len(self._kept) < KEEP:
                self._kept.append(conn)
                return
        self._discard(conn)

    def _exchange(self, conn: tuple[socket.socket, Any], data: bytes, timeout: float | None,
                  kept: bool = False) -> bytes:
        """Send a request and read the reply line; a connection that ended without a whole
        line is closed. A ``kept`` connection closed before any of the reply raises
        :class:`_Stale` (the server closes one only between requests, serving none on it)."""
        sock, reader = conn
        sent = False
        try:
            sock.settimeout(timeout or self.timeout)
            try:
                sock.sendall(data)
                sent = True
            except (BrokenPipeError, ConnectionResetError):
                if kept:
                    raise
                # a fresh connection the server refused: its reply (busy) may wait to be read
            line: bytes = reader.readline()
        except BaseException as exc:
            self._discard(conn)
            if kept and isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                raise _Stale(sent) from None
            if isinstance(exc, OSError):
                raise self._unreachable(exc) from None
            raise
        if not line.endswith(b"\n"):
            self._discard(conn)
            if kept and not line:
                raise _Stale(sent)
        return line

    @staticmethod
    def _discard(conn: tuple[socket.socket, Any]) -> None:
        conn[1].close()
        conn[0].close()

    def _unreachable(self, exc: BaseException) -> UnreachableError:
        """What an error of the socket says to the caller."""
        if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
            absent = UnreachableError(f"cannot reach the server at {self.socket_path}: {exc.strerror}")
            absent.absent = True
            return absent
        if isinstance(exc, PermissionError):
            denied = UnreachableError(f"no permission to use {self.socket_path}"
                                      " (are you in the yadtq group?)")
            denied.lasting = True
            return denied
        if isinstance(exc, TimeoutError):
            return UnreachableError(f"the server at {self.socket_path} did not answer in time")
        return UnreachableError(f"talking to the server at {self.socket_path}: {exc}")

    def submit(self, task: str, *args: Any, kwargs: Mapping[str, Any] | None = None,
               task_id: str | None = None, timeout: float | None = None,
               max_retries: int | None = None, retry_backoff: float | None = None,
               queue_anyway: bool = False, priority: int = 0, delay: float | None = None,
               eta: str | dt.datetime | None = None, then: Mapping[str, Any] | None = None,
               limit_key: str | None = None) -> str:
        """Submit a task; returns its id once the task is recorded and Kafka accepted it.
        ``priority``: higher runs first (FIFO within one); ``delay`` (seconds) or ``eta``
        (ISO 8601, or an aware datetime): the task is ``scheduled`` until then. ``then``: a
        follow-up (``{"task": ..., "args": [...]}``) queued when this task succeeds, with its
        result as the first argument, under the id ``<id>.then``. ``limit_key``: the global
        limits of the task's name (``[limits."NAME"]``) apply to this key's tasks apart.

        A task name no live worker provides is refused (:class:`RequestError`, code
        ``unroutable``, naming what is provided) unless ``queue_anyway``: then it waits for a
        worker that provides it, at most the server's ``unroutable_timeout``.
        """
        body = submission(task, args, kwargs, task_id, timeout, max_retries, retry_backoff,
                          priority, delay, eta, then, limit_key)
        request: dict[str, Any] = {"op": "submit", "task": body}
        if queue_anyway:
            request["queue_anyway"] = True
        deadline = time.monotonic() + self.timeout
        tried = False
        while True:  # the same id again is a no-op, so a lost reply is safe to ask again for
            try:
                reply = self.request(request)
                return str(reply["task-id"])
            except UnreachableError as exc:
                if exc.lasting or (exc.absent and not tried):
                    raise  # nobody there at all (a wrong socket, no server): say so at once
                tried = True
                if time.monotonic() + RETRY_PAUSE >= deadline:
                    raise UnreachableError(
                        f"{exc}; task {body['task-id']} may have been accepted: `yadtqctl status"
                        f" {body['task-id']}` tells, and submitting again with --id"
                        f" {body['task-id']} is safe (the same id twice is one task)") from None
            time.sleep(RETRY_PAUSE)  # the server restarting: ask again

    def status(self, *task_ids: str) -> dict[str, dict[str, Any]]:
        """The status of each task, in the result-backend shape; ``unknown`` for unseen ids."""
        return dict(self.request({"op": "status", "ids": list(task_ids)})["tasks"])

    def result(self, task_id: str, wait: float | None = None) -> dict[str, Any]:
        """The task's status and result; with ``wait``, once it is terminal (or
        :class:`WaitTimeout` after ``wait`` seconds)."""
        if not wait:
            return dict(self.request({"op": "result", "id": task_id})["task"])
        deadline = time.monotonic() + wait
        reached = False
        while True:
            left = deadline - time.monotonic()
            step = min(left, 600.0)
            try:
                reply = self.request({"op": "result", "id": task_id, "wait": max(step, 0)},
                                     timeout=step + self.timeout)
                reached = True
            except UnreachableError as exc:
                # once the server was there, its going away is a restart to wait through
                reached = reached or not exc.absent
                if exc.lasting or not reached or deadline - time.monotonic() <= RETRY_PAUSE:
                    raise
                time.sleep(RETRY_PAUSE)  # the server restarting: the wait goes on
                continue
            view: dict[str, Any] = reply["task"]
            if view["status"] in TERMINAL:
                return view
            if deadline - time.monotonic() <= 0:
                raise WaitTimeout(f"task {task_id} is still {view['status']} after {wait:g} s")

    def tasks(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Tasks, optionally of one status."""
        req: dict[str, Any] = {"op": "tasks", "limit": limit}
        if status:
            req["status"] = [status]
        return list(self.request(req)["tasks"])

    def cancel(self, *task_ids: str) -> dict[str, dict[str, Any]]:
        """Cancel tasks. Each id's ``outcome``: ``cancelled`` (it had not started),
        ``cancelling`` (a worker is stopping it; it ends ``cancelled``), ``ended`` (it ended
        first and keeps its result), ``unknown``, or ``requested`` (the active has not applied
        it within a few seconds; it will); with the task's status view."""
        return dict(self.request({"op": "cancel", "ids": list(task_ids)})["tasks"])

    def retry(self, *task_ids: str) -> dict[str, dict[str, Any]]:
        """Run failed or cancelled tasks again as new attempts (their earlier runs kept in
        ``history``). Each id's ``outcome``: ``retried``, ``succeeded`` or ``not_ended`` (nothing
        to retry), ``unknown`` or ``requested``; with the task's status view."""
        return dict(self.request({"op": "retry", "ids": list(task_ids)})["tasks"])

    def purge(self, older_than: float, statuses: tuple[str, ...] = ()) -> dict[str, Any]:
        """Order the deletion of tasks that ended more than ``older_than`` seconds ago (only
        these terminal ``statuses``, if given); returns ``before`` (ISO 8601) and how many
        tasks ``matching`` now. The active server deletes them in batches."""
        request: dict[str, Any] = {"op": "purge", "older_than": older_than}
        if statuses:
            request["status"] = list(statuses)
        return self.request(request)

    def schedules(self) -> list[dict[str, Any]]:
        """The configured schedules: name, task, args, cron, missed, last_tick, fired,
        next_tick."""
        return list(self.request({"op": "schedules"})["schedules"])

    def workers(self) -> list[dict[str, Any]]:
        """Worker epochs, live ones first."""
        return list(self.request({"op": "workers"})["workers"])

    def failures(self, limit: int = 100) -> list[dict[str, Any]]:
        """Worker failures, newest first."""
        return list(self.request({"op": "failures", "limit": limit})["failures"])

    def stats(self) -> dict[str, Any]:
        """Counts of tasks by status, live workers and counters."""
        return dict(self.request({"op": "stats"})["stats"])

    def snapshot(self, limit: int = 50) -> dict[str, Any]:
        """Everything the live monitor shows, in one reply."""
        return dict(self.request({"op": "snapshot", "limit": limit})["snapshot"])

    def watch(self, interval: float = 1.0, limit: int = 50) -> Iterator[dict[str, Any]]:
        """Snapshots every ``interval`` seconds over one connection, until it breaks
        (:class:`UnreachableError`) or the caller stops iterating."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(max(self.timeout, 5 * interval))
                sock.connect(self.socket_path)
                sock.sendall(json.dumps({"op": "watch", "interval": interval, "limit": limit}).encode()
                             + b"\n")
                with sock.makefile("rb") as reader:
                    while line := reader.readline():
                        reply = json.loads(line)
                        if not reply.get("ok"):
                            err = reply.get("error", {})
                            raise RequestError(err.get("code", "internal"), err.get("message", ""))
                        yield reply["snapshot"]
        except OSError as exc:
            raise UnreachableError(f"lost the server at {self.socket_path}: {exc}") from None
        raise UnreachableError(f"the server at {self.socket_path} closed the connection")

    def plugins(self) -> dict[str, Any]:
        """The task names live workers provide, with plugin and version."""
        return dict(self.request({"op": "plugins"})["tasks"])


class KafkaSubmitter:
    """Submits straight to the ``tasks`` topic; for hosts without the server's socket."""

    def __init__(self, kafka: Mapping[str, Any], topic_prefix: str = "yadtq", timeout: float = 30.0) -> None:
        from confluent_kafka import Producer

        settings = dict(kafka)
        settings.update({"acks": "all", "enable.idempotence": True})
        # a topic's max.message.bytes bounds a batch, and the server's limits are not known
        # here: batches no larger than the room any tasks topic the server accepts has
        settings.setdefault("batch.size", m.ENVELOPE_BYTES)
        self.producer = Producer(settings)
        self.topic = f"{topic_prefix}.tasks"
        self.timeout = timeout
        self._checked = False

    def submit(self, task: str, *args: Any, kwargs: Mapping[str, Any] | None = None,
               task_id: str | None = None, timeout: float | None = None,
               max_retries: int | None = None, retry_backoff: float | None = None,
               priority: int = 0, delay: float | None = None, eta: str | dt.datetime | None = None,
               then: Mapping[str, Any] | None = None, limit_key: str | None = None) -> str:
        """Produce a submission and wait until Kafka accepted it; returns the task id.
        ``priority``, ``delay``, ``eta``, ``then`` and ``limit_key`` as for
        :meth:`Client.submit`."""
        body = submission(task, args, kwargs, task_id, timeout, max_retries, retry_backoff,
                          priority, delay, eta, then, limit_key)
        try:
            m.parse_submission(json.dumps(body).encode(), 1 << 30)
        except Exception as exc:
            raise UsageError(str(exc)) from None
        from yadtqd.transport import deliver  # here, so that importing the client stays light

        self._check_topic()
        problem = deliver(self.producer, self.topic, json.dumps(body).encode(), body["task-id"],
                          self.timeout)
        if problem:
            raise UnreachableError(f"Kafka did not accept task {body['task-id']}: {problem}")
        return str(body["task-id"])

    def _check_topic(self) -> None:
        """Say at once when the topic does not exist (a wrong ``topic_prefix``), rather than
        after the delivery timeout."""
        if self._checked:
            return
        from confluent_kafka import KafkaError, KafkaException

        try:  # every topic's metadata: asking for one by name would create it on brokers
            # with auto.create.topics.enable (Kafka's default), and the task would go nowhere
            info = self.producer.list_topics(timeout=self.timeout).topics.get(self.topic)
        except KafkaException as exc:
            raise UnreachableError(f"cannot reach Kafka: {exc.args[0].str()}") from None
        if info is None or (info.error is not None
                            and info.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
            raise UsageError(f"topic {self.topic} does not exist: is the topic prefix right? (the"
                             " server creates <prefix>.tasks when it starts; the prefix is the"
                             " daemons' topic_prefix)")
        self._checked = True

    def close(self) -> None:
        """Deliver anything outstanding."""
        self.producer.flush(self.timeout)

    def __enter__(self) -> KafkaSubmitter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
