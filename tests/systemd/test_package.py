"""The Debian package's lifecycle under a real systemd (issue 17, item 7), after Debian's
conventions (what dh_installsystemd generates): install enables yadtqd.target and starts no role
by itself; an upgrade restarts the running daemons onto the new code and keeps plugins (they live
in /usr/local/lib/yadtq, which dpkg does not own); removal stops every daemon; purge removes the
state and logs and keeps the system user. lintian finds nothing the package does not explain.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.systemd.conftest import config_for
from tests.systemd.container import Container, bookworm_root

pytestmark = pytest.mark.kafka
UNITS = ("yadtqd@server", "yadtqd@worker")


@pytest.fixture(scope="module")
def box(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    root = bookworm_root(tmp_path_factory.mktemp("package") / "root")
    container = Container(root, {str(artifacts): "/srv/yadtq"})
    container.boot()
    try:
        yield container
    finally:
        print(container.run("journalctl", "--no-pager", "-n", "60", "-u", "yadtqd@*", check=False).stdout)
        container.poweroff()


def _deb(artifacts: Path) -> Path:
    (deb,) = artifacts.glob("yadtqd_*.deb")
    return deb


def _upgrade(deb: Path, into: Path) -> str:
    """The same package under a higher version, as an upgrade would bring it."""
    work = into / "repack"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(work)], check=True)
    control = work / "DEBIAN" / "control"
    version = next(line.split()[1] for line in control.read_text().splitlines() if line.startswith("Version:"))
    control.write_text(control.read_text().replace(f"Version: {version}", f"Version: {version}+1"))
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "-b", str(work), str(into / "upgrade.deb")],
                   check=True, capture_output=True)
    shutil.rmtree(work)
    return "/upgrade.deb"


def _pids(box: Container) -> dict[str, str]:
    return {unit: box.run("systemctl", "show", "-p", "MainPID", "--value", unit).stdout.strip()
            for unit in UNITS}


def _add(box: Container) -> str:
    """40 + 2 through both daemons. Queued even before the worker's hello reaches the server
    (it may just have started): a worker without the arith plugin would leave it waiting."""
    return box.run("yadtqctl", "submit", "add", "40", "2", "--queue-anyway", "--wait", "60").stdout.strip()


def test_lintian_finds_nothing_unexplained(artifacts: Path) -> None:
    done = subprocess.run(["lintian", "--no-cfg", "--fail-on", "error,warning", str(_deb(artifacts))],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "E:" not in done.stdout and "W:" not in done.stdout, done.stdout


def test_install_upgrade_remove_purge(box: Container, artifacts: Path, bootstrap: str) -> None:
    box.run("dpkg", "-i", f"/srv/yadtq/{_deb(artifacts).name}")
    assert box.run("systemctl", "is-enabled", "yadtqd.target").stdout.strip() == "enabled"
    assert box.run("systemctl", "is-active", *UNITS, check=False).stdout.split() == ["inactive"] * 2
    assert box.run("readlink", "-f", "/usr/lib/yadtq/bin/python").stdout.strip() == "/usr/bin/python3.11"
    depends = box.run("dpkg-query", "-W", "-f", "${Depends}", "yadtqd").stdout
    assert depends.startswith("python3.11,")
    assert box.run("find", "/usr/lib/yadtq/lib", "-name", "*.pyc", "-print", "-quit").stdout  # compiled

    # The admin's steps, as the README gives them: a plugin, the configuration, each role.
    box.run("/usr/lib/yadtq/bin/pip", "install", "-q", "--no-index", "--find-links", "/srv/yadtq/wheels",
            "yadtq-arith")
    plugin = box.run("/usr/lib/yadtq/bin/python", "-c",
                     "import yadtq_arith; print(yadtq_arith.__file__)").stdout.strip()
    assert plugin.startswith("/usr/local/lib/yadtq/")
    assert box.run("dpkg", "-S", plugin, check=False).returncode != 0  # not dpkg's
    box.run("tee", "/etc/yadtq/yadtq.toml", input=config_for(bootstrap))
    box.run("systemctl", "enable", "--now", *UNITS)
    assert _add(box) == "42"
    before = _pids(box)

    upgrade = _upgrade(_deb(artifacts), box.root)
    box.run("dpkg", "-i", upgrade)
    after = _pids(box)
    assert all(after[unit] not in ("0", before[unit]) for unit in UNITS), (before, after)
    assert box.run("systemctl", "is-active", *UNITS).stdout.split() == ["active"] * 2
    assert _add(box) == "42"  # the plugin survived the upgrade

    # dpkg does not bring back a conffile the admin deleted, and configuring must not fail on it.
    box.run("systemctl", "stop", "yadtqd.target")
    box.run("mv", "/etc/yadtq/yadtq.toml", "/root/yadtq.toml")
    box.run("dpkg", "-i", upgrade)
    box.run("mv", "/root/yadtq.toml", "/etc/yadtq/yadtq.toml")

    box.run("systemctl", "start", *UNITS)
    box.run("dpkg", "-r", "yadtqd")
    assert box.run("pgrep", "-f", "yadtqd", check=False).returncode == 1  # none left running
    assert box.run("test", "-e", "/var/lib/yadtq/yadtq.db", check=False).returncode == 0  # remove keeps data

    box.run("dpkg", "-P", "yadtqd")
    for gone in ("/var/lib/yadtq", "/var/log/yadtq", "/etc/yadtq", "/etc/systemd/system/yadtqd.target.wants"):
        assert box.run("test", "-e", gone, check=False).returncode == 1, gone
    assert box.run("getent", "passwd", "yadtq").returncode == 0  # the user stays, as policy says
    assert box.run("test", "-e", plugin, check=False).returncode == 0  # the admin's plugins stay
