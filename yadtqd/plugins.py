"""Plugin loading: find packages in the entry-point group ``yadtq``, load them with pluggy, and
collect the tasks they register through a callback that validates each name.

Loading happens in :func:`load`, never at import time. One broken plugin (an import error, an
exception or ``sys.exit()`` while importing or registering, a duplicate or bad name) is reported by name in
:attr:`Registry.problems` and in the log; the others load.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from yadtqd import hookspecs

log = logging.getLogger("yadtqd.plugins")

GROUP = "yadtq"
TASK_NAME = re.compile(r"^\S.{0,199}$")


@dataclass(frozen=True)
class TaskEntry:
    """A task function and the plugin that registered it."""

    name: str
    function: Callable[..., Any]
    plugin: str
    version: str


@dataclass
class Registry:
    """Every task the installed plugins provide, and every plugin that failed."""

    tasks: dict[str, TaskEntry] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    plugins: dict[str, str] = field(default_factory=dict)

    def register_for(self, plugin: str, version: str) -> hookspecs.Register:
        """The ``register`` callback handed to one plugin."""

        def register(name: str, function: Callable[..., Any]) -> None:
            problem = self._check(name, function)
            if problem:
                self._problem(plugin, f"cannot register task {name!r}: {problem}")
                return
            self.tasks[name] = TaskEntry(name, function, plugin, version)

        return register

    def _check(self, name: object, function: object) -> str | None:
        if not isinstance(name, str) or not TASK_NAME.match(name):
            return "a task name is 1 to 200 characters and does not start with a space"
        if not callable(function):
            return f"{function!r} is not callable"
        if name in self.tasks:
            return f"the name is already registered by plugin {self.tasks[name].plugin!r}"
        return None

    def _problem(self, plugin: str, message: str) -> None:
        log.error("plugin %s: %s", plugin, message, extra={"event": "plugin_broken"})
        self.problems[plugin] = message


def load(only: Iterable[str] = (), extra: Iterable[tuple[str, object]] = ()) -> Registry:
    """Load the plugins in the entry-point group (only those named in ``only``, if any), plus
    ``extra`` ``(name, module)`` pairs."""
    only = set(only)
    manager = pluggy.PluginManager(GROUP)
    manager.add_hookspecs(hookspecs)
    registry = Registry()
    versions: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=GROUP):
        if only and ep.name not in only:
            continue
        version = ep.dist.version if ep.dist else ""
        try:
            manager.register(ep.load(), name=ep.name)
            versions[ep.name] = version
        except BaseException as exc:  # noqa: B036 a broken plugin (even one calling sys.exit()) must not stop the worker
            registry._problem(ep.name, f"failed to load {ep.value}: {type(exc).__name__}: {exc}")
    for name, module in extra:
        manager.register(module, name=name)
        versions[name] = ""
    for impl in manager.hook.yadtq_register_tasks.get_hookimpls():  # registration order
        _call(registry, impl, versions.get(impl.plugin_name, ""))
    registry.plugins = {name: versions[name] for name in versions if name not in registry.problems}
    return registry


def _call(registry: Registry, impl: pluggy.HookImpl, version: str) -> None:
    try:
        impl.function(register=registry.register_for(impl.plugin_name, version))
    except BaseException as exc:  # noqa: B036 a broken plugin (even one calling sys.exit()) must not stop the worker
        registry._problem(impl.plugin_name, f"yadtq_register_tasks raised {type(exc).__name__}: {exc}")
