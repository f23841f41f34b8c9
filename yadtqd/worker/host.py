"""What the worker process does to itself and asks of its host: it drops its own settings from
the environment before task code can read them, and reads the machine's boot id (with the host
name, it tells a restart of the worker from a second process with its id)."""

from __future__ import annotations

import ctypes
import os


def scrub_environment() -> None:
    """Drop the daemon's own settings (``YADTQ_*``, Kafka credentials among them) from the
    environment, once loaded: execution processes started afterwards inherit none of them, not
    even in ``/proc/self/environ``. The worker's own ``/proc/<pid>/environ`` still holds its
    start-up environment, so the worker makes itself not dumpable (``PR_SET_DUMPABLE`` 0): its
    ``/proc`` files then belong to root, and task code running as the same user cannot read
    them (nor attach a debugger to the worker)."""
    for name in [n for n in os.environ if n.startswith("YADTQ_")]:
        del os.environ[name]
    try:
        ctypes.CDLL(None, use_errno=True).prctl(4, 0)  # PR_SET_DUMPABLE
    except (OSError, AttributeError):
        pass  # not Linux


def boot_id() -> str:
    """This machine's boot id (with the host name, it tells a restart from a second process)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""
