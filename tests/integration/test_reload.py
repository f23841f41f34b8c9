"""SIGHUP reloads plugins: a newly installed plugin is discovered and advertised, a removed one
withdrawn, and a task running meanwhile is undisturbed."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from tests.cluster import Cluster

pytestmark = pytest.mark.kafka

PLUGIN = '''
import yadtqd

def triple(x):
    return 3 * x

@yadtqd.hookimpl
def yadtq_register_tasks(register):
    register("triple", triple)
'''


def install_plugin(site: Path, name: str = "extra", body: str = PLUGIN, version: str = "1.2") -> None:
    """Install a plugin package the way pip lays it out: the module and its dist-info."""
    (site / f"yadtq_{name}").mkdir()
    (site / f"yadtq_{name}" / "__init__.py").write_text(body)
    info = site / f"yadtq_{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: yadtq-{name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[yadtq]\n{name} = yadtq_{name}\n")


def test_sighup_discovers_and_withdraws_plugins(cluster: Cluster, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    cluster.start_server()
    worker = cluster.start_worker("w1", env={"PYTHONPATH": str(site)})
    assert "triple" not in cluster.client.plugins()
    running = cluster.client.submit("sleep", 3)
    cluster.wait_for(lambda: cluster.client.status(running)[running]["status"] == "processing",
                     "a task to be running during the reload")
    install_plugin(site)
    worker.send_signal(signal.SIGHUP)
    cluster.wait_for(lambda: "triple" in cluster.client.plugins(), "triple to be advertised")
    (provider,) = cluster.client.plugins()["triple"]
    assert (provider["plugin"], provider["version"], provider["worker"]) == ("extra", "1.2", "w1")
    assert cluster.client.result(cluster.client.submit("triple", 14), wait=60)["result"] == 42
    view = cluster.client.result(running, wait=60)
    assert (view["status"], view["attempt"]) == ("success", 1)  # undisturbed by the reload
    shutil.rmtree(site / "yadtq_extra-1.2.dist-info")
    worker.send_signal(signal.SIGHUP)
    cluster.wait_for(lambda: "triple" not in cluster.client.plugins(), "triple to be withdrawn")
    waiting = cluster.client.submit("triple", 1, queue_anyway=True)
    assert cluster.client.status(waiting)[waiting]["waiting"] == "no live worker provides task 'triple'"
    assert cluster.client.failures() == []
    assert len(cluster.epochs("w1")) == 1  # same epoch throughout


def install_broken_plugin(site: Path, body: str) -> None:
    """A plugin whose import does ``body`` (exits, or blocks)."""
    install_plugin(site, "broken", body, "0.1")


def test_a_plugin_calling_sys_exit_at_import_is_reported_and_the_rest_reload(
        cluster: Cluster, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    cluster.start_server()
    worker = cluster.start_worker("w1", env={"PYTHONPATH": str(site)})
    (epoch,) = cluster.epochs("w1", live=True)
    install_broken_plugin(site, "import sys\nsys.exit(4)\n")
    install_plugin(site)
    worker.send_signal(signal.SIGHUP)
    cluster.wait_for(lambda: "triple" in cluster.client.plugins(), "the good plugin to be advertised")
    assert cluster.client.result(cluster.client.submit("triple", 2), wait=60)["result"] == 6
    assert cluster.client.result(cluster.client.submit("add", 2, 2), wait=60)["result"] == 4
    assert "plugin broken skipped: failed to load yadtq_broken: SystemExit: 4" in cluster.log("w1")
    assert cluster.epochs("w1", live=True) == {epoch} and cluster.client.failures() == []


def test_a_plugin_that_hangs_at_import_abandons_the_reload(cluster: Cluster, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    cluster.write_config(worker={"stall_timeout": 2.0})  # the reload waits max(10 s, this)
    cluster.start_server()
    worker = cluster.start_worker("w1", env={"PYTHONPATH": str(site)})
    (epoch,) = cluster.epochs("w1", live=True)
    install_broken_plugin(site, "import time\ntime.sleep(3600)\n")
    worker.send_signal(signal.SIGHUP)
    cluster.wait_for(lambda: "plugin reload abandoned" in cluster.log("w1"), "the reload to give up")
    assert "did not load within" in cluster.log("w1")
    assert cluster.client.result(cluster.client.submit("add", 2, 3), wait=60)["result"] == 5
    assert cluster.epochs("w1", live=True) == {epoch} and cluster.client.failures() == []


def test_a_slot_that_never_finishes_loading_is_a_stall(cluster: Cluster, tmp_path: Path) -> None:
    """The plugins on disk changed under a running worker: a slot replaced after a crash hangs
    loading them. The worker must stop heartbeating (and be restarted by systemd's watchdog)
    rather than heartbeat on with a slot that can never run anything."""
    site = tmp_path / "site"
    site.mkdir()
    cluster.write_config(server={"heartbeat_timeout": 2.0},
                         worker={"heartbeat_interval": 0.25, "stall_timeout": 1.0})
    cluster.start_server()
    cluster.start_worker("w1", env={"PYTHONPATH": str(site)}, slots=1)
    install_broken_plugin(site, "import time\ntime.sleep(3600)\n")
    crashed = cluster.client.submit("exit", 3)  # its slot is replaced by a process that hangs
    assert cluster.client.result(crashed, wait=60)["error"]["type"] == "ExecutionProcessDied"
    (failure,) = cluster.wait_for(lambda: cluster.client.failures(), "w1 to be declared dead")
    assert failure["worker"] == "w1" and failure["reason"].startswith("no heartbeat")
