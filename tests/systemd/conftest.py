"""What the systemd tests share: the package, built once per session, and a configuration."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.systemd.container import bookworm_root

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels built on the host and the .deb built in a bookworm root."""
    out = tmp_path_factory.mktemp("artifacts")
    wheels = out / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), str(ROOT),
                    str(ROOT / "plugins" / "arith"), str(ROOT / "plugins" / "demo")],
                   check=True, capture_output=True)
    build_root = bookworm_root(tmp_path_factory.mktemp("build") / "root")
    subprocess.run([str(ROOT / "packaging" / "build-deb"), str(build_root), str(wheels), str(out)],
                   check=True, capture_output=True, text=True)
    return out


def config_for(bootstrap: str) -> str:
    """/etc/yadtq/yadtq.toml for a container's daemons on the session's broker, own topics."""
    return (f'topic_prefix = "sd{uuid.uuid4().hex[:8]}"\n[kafka]\n'
            f'"bootstrap.servers" = "{bootstrap}"\n[server]\nheartbeat_timeout = 3.0\n'
            '[worker]\nid = "box"\nslots = 2\nheartbeat_interval = 0.5\n')
