"""How many files a daemon may open (``RLIMIT_NOFILE``), against how many its configuration needs.

systemd starts services with a soft limit of 1,024 open files and a hard one of 524,288, and
asks a program that needs more to raise its soft limit itself, as long as it does not use
``select()`` on them (systemd.exec(5), ``LimitNOFILE=``). A worker holds five descriptors for
each execution slot (three pipes' ends, the process's sentinel, its pidfd or tracker: measured
20 + 5 a slot), so about 150 to 200 slots (``slots = 0`` on a large machine) outgrew 1,024, and the
worker died at start with ``OSError: Too many open files``. The daemon now raises its soft limit
to the hard one when the configuration needs more than the soft allows, refuses to start (exit
78) when even the hard one is too low, naming both, and its execution processes get the soft
limit back: task code that uses ``select()`` keeps the limit it was written for.
"""

from __future__ import annotations

import logging
import resource

from yadtqd.errors import ConfigError

log = logging.getLogger("yadtqd")

#: Descriptors a worker holds for each execution slot (measured: 5).
PER_SLOT = 5
#: Descriptors a socket connection takes in the server: the connection, and its thread's
#: SQLite connection (the database and its WAL; measured 3), with one to spare.
PER_CONNECTION = 4
#: Descriptors a daemon holds besides those: logs, SQLite, its own pipes, and 2 or 3 sockets per
#: broker for each of its Kafka clients (the server has 9: 75 measured with one broker).
BASE = 256
#: How an operator gives a daemon more: what a refusal ends with.
RAISE = "raise the limit (LimitNOFILE= in the systemd unit, ulimit -n in a shell)"


def worker_needs(slots: int) -> int:
    """Open files a worker of ``slots`` slots needs, a reload's probe process included."""
    return BASE + PER_SLOT * (slots + 1)


def server_needs(max_connections: int) -> int:
    """Open files a server serving ``max_connections`` connections needs (one more is
    answered 'busy')."""
    return BASE + PER_CONNECTION * (max_connections + 1)


def ensure(needed: int, why: str) -> int:
    """Make sure this process may open ``needed`` files: raise the soft limit to the hard one
    when the soft one is lower, or raise :class:`ConfigError` when the hard one is. Returns the
    soft limit as it was, for child processes to get back (:func:`restore`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return soft
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise ConfigError(f"{why} needs about {needed} open files, but this process may open at"
                          f" most {hard} (RLIMIT_NOFILE; soft {soft}): lower it, or {RAISE}")
    target = needed if hard == resource.RLIM_INFINITY else hard  # (the kernel caps "unlimited")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{why} needs about {needed} open files, but this process may open"
                          f" {soft} and cannot raise that ({exc}): {RAISE}") from None
    log.info("open files limit raised from %d to %d: %s needs about %d", soft, target, why, needed)
    return soft


def restore(soft: int) -> None:
    """Give this (child) process the soft limit its parent started with, if lower than now."""
    now, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (now == resource.RLIM_INFINITY or soft < now):
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
