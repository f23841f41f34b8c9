"""The daemon under a real systemd (PID 1 in a systemd-nspawn container): the Debian package,
the unit template, readiness, status, journald fields, reload, drain and the watchdog.

The package is built by packaging/build-deb in a bookworm root; the container installs it and
runs ``yadtqd@server`` and ``yadtqd@worker`` against the test broker on the host.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.systemd.conftest import config_for
from tests.systemd.container import Container, bookworm_root

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def box(artifacts: Path, bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    root = bookworm_root(tmp_path_factory.mktemp("container") / "root")
    container = Container(root, {str(artifacts): "/srv/yadtq"})
    container.boot()
    try:
        (deb,) = artifacts.glob("yadtqd_*.deb")
        container.run("dpkg", "-i", f"/srv/yadtq/{deb.name}")
        container.run("/usr/lib/yadtq/bin/pip", "install", "-q", "--no-index", "--find-links",
                      "/srv/yadtq/wheels", "yadtq-arith")
        container.run("tee", "/etc/yadtq/yadtq.toml", input=config_for(bootstrap))
        yield container
    finally:
        print(container.run("journalctl", "--no-pager", "-n", "60", "-u", "yadtqd@*", check=False).stdout)
        container.poweroff()


def ctl(box: Container, *args: str) -> subprocess.CompletedProcess[str]:
    return box.run("yadtqctl", *args, check=False)


def show(box: Container, unit: str, prop: str) -> str:
    return box.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()


def wait(condition, what: str, timeout: float = 90.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)  # polling systemd state from outside the container
    raise AssertionError(f"timed out waiting for {what}")


def test_units_verify_cleanly_and_report_their_exposure(box: Container) -> None:
    verify = box.run("systemd-analyze", "verify", "yadtqd@server.service", "yadtqd@worker.service",
                     "yadtqd.target", check=False)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
    security = box.run("systemd-analyze", "security", "--offline=true",
                       "/lib/systemd/system/yadtqd@.service", check=False)
    (overall,) = [line for line in security.stdout.splitlines() if "Overall exposure level" in line]
    print(overall)
    assert float(overall.split(":")[1].split()[0]) <= 3.0, security.stdout


def test_server_and_worker_start_ready_and_serve(box: Container) -> None:
    box.run("systemctl", "start", "yadtqd@server")  # returns once READY=1 arrived
    box.run("systemctl", "start", "yadtqd@worker")
    for unit in ("yadtqd@server", "yadtqd@worker"):
        assert box.run("systemctl", "is-active", unit).stdout.strip() == "active"
        assert show(box, unit, "User") == "yadtq"
    assert show(box, "yadtqd@worker", "StatusText").startswith("worker box: busy 0/2")
    wait(lambda: show(box, "yadtqd@server", "StatusText").startswith("active, workers 1"), "the server's status")
    done = ctl(box, "submit", "add", "40", "2", "--wait", "60")
    assert (done.returncode, done.stdout.strip()) == (0, "42")
    mode = box.run("stat", "-c", "%a %G", "/run/yadtq/yadtqd.sock").stdout.split()
    assert mode == ["660", "yadtq-clients"]


def test_a_client_may_submit_but_not_read_the_daemons_secrets(box: Container) -> None:
    """The trust boundary (issue 17, item 1): yadtq-clients use the socket; only the daemons'
    group reads the configuration with its Kafka credentials; each submit logs the client's uid."""
    box.run("useradd", "--no-create-home", "--groups", "yadtq-clients", "alice")
    box.run("useradd", "--no-create-home", "bob")

    def as_user(user: str, *command: str) -> subprocess.CompletedProcess[str]:
        return box.run("runuser", "-u", user, "--", *command, check=False)

    done = as_user("alice", "yadtqctl", "submit", "add", "2", "2", "--wait", "60")
    assert (done.returncode, done.stdout.strip()) == (0, "4"), done.stderr
    assert as_user("alice", "cat", "/etc/yadtq/yadtq.toml").returncode != 0
    uid = box.run("id", "-u", "alice").stdout.strip()
    log = box.run("journalctl", "--no-pager", "-u", "yadtqd@server").stdout
    assert f"(socket, uid {uid})" in log
    outsider = as_user("bob", "yadtqctl", "stats")
    assert outsider.returncode == 3 and "no permission" in outsider.stderr


def test_journal_holds_a_tasks_trail_across_server_and_worker(box: Container) -> None:
    task_id = f"trail-{uuid.uuid4().hex[:8]}"
    assert ctl(box, "submit", "mul", "6", "7", "--id", task_id, "--wait", "60").returncode == 0
    def trail() -> list[dict]:
        out = box.run("journalctl", "--no-pager", "-o", "json", f"TASK_ID={task_id}").stdout
        return [json.loads(line) for line in out.splitlines()]
    entries = wait(lambda: (t := trail()) and {e.get("ROLE") for e in t} == {"server", "worker"} and t,
                   "entries from both roles")
    events = {e["EVENT"] for e in entries}
    assert {"task_received", "task_started", "task_success"} <= events
    assert {e["_SYSTEMD_UNIT"] for e in entries} == {"yadtqd@server.service", "yadtqd@worker.service"}
    assert all(e["PRIORITY"] == "6" for e in entries)
    warning = box.run("journalctl", "--no-pager", "-p", "warning", "-u", "yadtqd@worker").stdout
    assert task_id not in warning


def test_reload_makes_a_newly_installed_plugin_available(box: Container) -> None:
    assert ctl(box, "--json", "submit", "echo", "x", "--queue-anyway").returncode == 0  # nobody provides it yet
    box.run("/usr/lib/yadtq/bin/pip", "install", "-q", "--no-index", "--find-links",
            "/srv/yadtq/wheels", "yadtq-demo")
    box.run("systemctl", "reload", "yadtqd@worker")
    wait(lambda: "echo" in json.loads(ctl(box, "--json", "plugins").stdout), "echo to be advertised")
    done = ctl(box, "--json", "submit", "echo", "hello", "--wait", "60")
    assert json.loads(done.stdout) and done.returncode == 0
    assert box.run("systemctl", "is-active", "yadtqd@worker").stdout.strip() == "active"
    assert show(box, "yadtqd@worker", "NRestarts") == "0"


def test_stop_drains_the_running_task(box: Container) -> None:
    task_id = f"drain-{uuid.uuid4().hex[:8]}"
    assert ctl(box, "submit", "sleep", "3", "--id", task_id).returncode == 0
    wait(lambda: json.loads(ctl(box, "--json", "status", task_id).stdout)[task_id]["status"] == "processing",
         "the task to run")
    box.run("systemctl", "stop", "yadtqd@worker")  # blocks until the drain is over
    view = json.loads(ctl(box, "--json", "status", task_id).stdout)[task_id]
    assert (view["status"], view["attempt"]) == ("success", 1)
    log = box.run("journalctl", "--no-pager", "-u", "yadtqd@worker").stdout
    assert "the server confirmed the leave" in log  # it exited once nothing more could come
    # and on a host with both, a stop of the whole target stops the worker first
    assert "yadtqd@server.service" in show(box, "yadtqd@worker", "After").split()
    assert "draining 1 running" in log
    assert show(box, "yadtqd@worker", "Result") == "success"


def test_watchdog_restarts_a_wedged_worker(box: Container) -> None:
    dropin = "/run/systemd/system/yadtqd@worker.service.d"
    box.run("mkdir", "-p", dropin)
    box.run("tee", f"{dropin}/wedge.conf",
            input="[Service]\nEnvironment=YADTQ_TEST_WEDGE_ON_TASK=cpu\nWatchdogSec=3\n")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", "yadtqd@worker")
    assert ctl(box, "submit", "cpu", "1000", "--queue-anyway").returncode == 0  # the worker may not be registered yet
    wait(lambda: int(show(box, "yadtqd@worker", "NRestarts")) >= 1, "systemd to restart the worker")
    log = box.run("journalctl", "--no-pager", "-u", "yadtqd@worker").stdout
    assert "Watchdog timeout" in log
    box.run("rm", f"{dropin}/wedge.conf")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "restart", "yadtqd@worker")
    assert box.run("systemctl", "is-active", "yadtqd@worker").stdout.strip() == "active"
