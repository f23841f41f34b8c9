"""The README, run as written: its first command (``./dev demo``), the commands it shows for
the demo cluster, every ``yadtqctl`` line of its install section and its Python snippet, so the
README cannot drift from the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.kafka


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def _commands(block: str, prefix: str) -> list[str]:
    """The command lines of a shell block that start with ``prefix``, comments cut."""
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith(prefix)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """``./dev demo`` in a directory of its own: (the directory, what it printed)."""
    directory = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "YADTQ_DEMO_DIR": str(directory)}
    done = subprocess.run(["./dev", "demo"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        yield directory, done.stdout
    finally:
        subprocess.run(["./dev", "stop"], cwd=ROOT, env=env, capture_output=True, timeout=120)


def _run(command: str, demo_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "YADTQ_DEMO_DIR": str(demo_dir), "YADTQ_CONFIG": str(demo_dir / "yadtq.toml")}
    if command.startswith("yadtqctl "):
        command = f"{Path(sys.executable).parent / 'yadtqctl'} {command[len('yadtqctl '):]}"
    return subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, executable="/bin/bash")


def test_the_first_command_runs_a_cluster_and_a_workload(demo: tuple[Path, str]) -> None:
    _, printed = demo
    assert "cluster up: a Kafka broker at 127.0.0.1:" in printed
    assert "the server, and the workers worker-a and worker-b" in printed
    assert "ZeroDivisionError" in printed and "TimeoutError" in printed  # the workload's failures
    assert "./dev ctl submit add 2 3 --wait" in printed


def test_the_demo_commands_work_as_written(demo: tuple[Path, str]) -> None:
    directory, _ = demo
    (block,) = [b for b in _blocks("sh") if "./dev ctl" in b]
    commands = _commands(block, "./dev ctl")
    assert commands, "the README shows commands for the demo"
    for command in commands:
        if command.endswith(" monitor"):
            command = f"set -o pipefail; {command} | head -c 200"  # the live view, cut short
        done = _run(command, directory)
        assert done.returncode == 0, (command, done.stderr)
    assert _run("./dev ctl submit add 2 3 --wait", directory).stdout.strip() == "5"


def test_every_yadtqctl_line_of_the_install_section_works(demo: tuple[Path, str]) -> None:
    directory, _ = demo
    task_id = _run("yadtqctl submit add 1 2", directory).stdout.strip()
    (block,) = [b for b in _blocks("sh") if "yadtqctl submit add 1 2 --wait" in b]
    commands = _commands(block, "yadtqctl")
    assert len(commands) >= 9
    for command in commands:
        command = command.replace("<id> [<id> ...]", f"{task_id} {task_id}").replace("<id>", task_id)
        done = _run(command, directory)
        assert done.returncode == 0, (command, done.stderr)
        if command.endswith("submit add 1 2 --wait"):
            assert done.stdout.strip() == "3"


def test_the_python_snippet_runs(demo: tuple[Path, str]) -> None:
    directory, _ = demo
    (snippet,) = [b for b in _blocks("python") if "from yadtqd.client import" in b]
    bootstrap = re.search(r'"bootstrap.servers" = "([^"]+)"', (directory / "yadtq.toml").read_text())
    assert bootstrap is not None
    code = snippet.replace("127.0.0.1:9092", bootstrap.group(1)).replace('topic_prefix="yadtq"',
                                                                          'topic_prefix="demo"')
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "YADTQ_SERVER_SOCKET": str(directory / "yadtqd.sock")})
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    assert "'status': 'success'" in first and "'result': 3" in first
    assert second == "3"
