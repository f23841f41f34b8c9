"""The hooks a YADTQ plugin can implement. These docstrings are the plugin author's manual.

A plugin is a Python package that declares an entry point in the group ``yadtq``::

    # pyproject.toml of the plugin package
    [project.entry-points.yadtq]
    arith = "yadtq_arith"

and implements hooks in that module with :data:`yadtqd.hookimpl`::

    import yadtqd

    @yadtqd.hookimpl
    def yadtq_register_tasks(register):
        register("add", add)

Install the package beside ``yadtqd`` and reload the worker (``systemctl reload
yadtqd@worker``, or SIGHUP): its tasks are advertised to the server and can be submitted.
A plugin that fails to import or to register is logged by name and skipped; the worker runs
the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("yadtq")

#: ``register(name, function)``: the callback handed to :func:`yadtq_register_tasks`.
Register = Callable[[str, Callable[..., Any]], None]


@hookspec
def yadtq_register_tasks(register: Register) -> None:
    """Register the task functions this plugin provides.

    Call ``register(name, function)`` once per task. ``name`` is what clients submit as
    ``"task"``: 1 to 200 characters, unique across every installed plugin (a second plugin
    registering a taken name is refused, and the log names both plugins). ``function`` is called
    as ``function(*args, **kwargs)`` with the submission's JSON ``args`` and ``kwargs`` in a
    worker's execution process, and must return a JSON value (dict, list, str, int, float, bool
    or None); anything else fails the task with a ``ResultNotJSON`` error. An exception raised by
    the function fails the task: its type, message and traceback become the task's error, and
    the task is retried if it was submitted with ``max_retries``.

    This hook is called once per process that runs tasks, after the plugin module is imported;
    it must not start work of its own.
    """
