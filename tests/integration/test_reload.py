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


def install_plugin(site: Path) -> None:
    """Install a plugin package the way pip lays it out: the module and its dist-info."""
    (site / "yadtq_extra").mkdir()
    (site / "yadtq_extra" / "__init__.py").write_text(PLUGIN)
    info = site / "yadtq_extra-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: yadtq-extra\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text("[yadtq]\nextra = yadtq_extra\n")


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
    waiting = cluster.client.submit("triple", 1)
    assert cluster.client.status(waiting)[waiting]["waiting"] == "no live worker provides task 'triple'"
    assert cluster.client.failures() == []
    assert len(cluster.epochs("w1")) == 1  # same epoch throughout
