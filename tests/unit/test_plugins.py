"""Plugin loading: the installed example plugins, duplicate names, broken plugins, and that
every hook is documented."""

from __future__ import annotations

import inspect
import types

import pytest

import yadtqd
from yadtqd import hookspecs, plugins


def _module(name: str, **tasks: object) -> types.ModuleType:
    module = types.ModuleType(name)

    @yadtqd.hookimpl
    def yadtq_register_tasks(register):  # type: ignore[no-untyped-def]
        for task, fn in tasks.items():
            register(task, fn)

    module.yadtq_register_tasks = yadtq_register_tasks  # type: ignore[attr-defined]
    return module


def test_installed_example_plugins_load_with_versions() -> None:
    registry = plugins.load()
    assert {"add", "sub", "mul", "div", "sleep", "fail", "echo", "cpu", "ledger"} <= set(registry.tasks)
    assert registry.tasks["add"].plugin == "arith"
    assert registry.tasks["add"].version == "0.1.0"
    assert registry.tasks["add"].function(1, 2) == 3
    # among those loaded: a user's own plugin installed beside them must not fail the tests
    assert registry.plugins.items() >= {"arith": "0.1.0", "demo": "0.1.0"}.items()


def test_only_the_named_plugins_load() -> None:
    registry = plugins.load(only=["arith"])
    assert "add" in registry.tasks and "sleep" not in registry.tasks


def test_duplicate_task_names_are_refused_naming_both_plugins(caplog: pytest.LogCaptureFixture) -> None:
    registry = plugins.load(only=["none"], extra=[("first", _module("first", job=len)),
                                                  ("second", _module("second", job=abs, other=abs))])
    assert registry.tasks["job"].plugin == "first"
    assert registry.tasks["other"].plugin == "second"
    assert "second" in registry.problems
    message = registry.problems["second"]
    assert "'job'" in message and "'first'" in message
    assert "plugin second" in caplog.text


def test_a_plugin_that_raises_is_reported_and_the_others_load() -> None:
    broken = types.ModuleType("broken")

    @yadtqd.hookimpl
    def yadtq_register_tasks(register):  # type: ignore[no-untyped-def]
        raise ImportError("no module named numpy")

    broken.yadtq_register_tasks = yadtq_register_tasks  # type: ignore[attr-defined]
    registry = plugins.load(only=["none"], extra=[("broken", broken), ("fine", _module("fine", ok=len))])
    assert "ok" in registry.tasks
    assert "no module named numpy" in registry.problems["broken"]


def test_a_plugin_that_fails_to_import_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    real = importlib.metadata.entry_points

    def with_broken(group: str):  # type: ignore[no-untyped-def]
        eps = list(real(group=group))
        eps.append(importlib.metadata.EntryPoint("ghost", "yadtq_ghost_missing", group))
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", with_broken)
    registry = plugins.load()
    assert "ModuleNotFoundError" in registry.problems["ghost"]
    assert "add" in registry.tasks


@pytest.mark.parametrize("name", ["", " lead", "x" * 201, 7])
def test_bad_task_names_are_refused(name: object) -> None:
    registry = plugins.load(only=["none"], extra=[("p", _module("p"))])
    registry.register_for("p", "")(name, len)  # type: ignore[arg-type]
    assert "p" in registry.problems and not registry.tasks


def test_every_hook_is_documented() -> None:
    hooks = [f for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("yadtq_")]
    assert hooks
    for hook in hooks:
        assert hook.__doc__ and len(hook.__doc__) > 200, hook.__name__
