"""A Debian bookworm container booted with systemd as PID 1 (systemd-nspawn), for tests of the
units, the package, sd_notify, the watchdog and journald under a real systemd.

The root is made once with debootstrap and cached as a zstd tarball under the cache directory;
each test session unpacks a fresh copy. The container shares the host's network, so the daemons
inside reach the test broker on 127.0.0.1. Commands run inside with nsenter. nspawn is launched
from cgroups of its own (removed afterwards) so that it leaves nothing at the cgroup root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from yadtqd.testing.broker import cache_dir

PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,libpam-systemd,procps"
CGROUP_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"))
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def mirror() -> str:
    """The Debian mirror apt on this machine uses."""
    for source in sorted(Path("/etc/apt/sources.list.d").glob("*")) + [Path("/etc/apt/sources.list")]:
        if not source.exists():
            continue
        for line in source.read_text().splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and "security" not in words[1]:
                return words[1]
            if words[:1] == ["deb"] and "security" not in line:
                return next(w for w in words[1:] if w.startswith("http"))
    return "http://deb.debian.org/debian"


def bookworm_root(target: Path) -> Path:
    """Unpack a fresh bookworm root into ``target``, making and caching it the first time."""
    key = hashlib.sha256(PACKAGES.encode()).hexdigest()[:12]
    tarball = cache_dir() / f"bookworm-{key}.tar.zst"
    if not tarball.exists():
        build = target.parent / f"debootstrap-{key}"
        shutil.rmtree(build, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm",
                        str(build), mirror()], check=True, capture_output=True)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (build / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        tarball.parent.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "--zstd", "-cf", str(partial), "-C", str(build), "."], check=True)
        partial.rename(tarball)
        shutil.rmtree(build)
    target.mkdir(parents=True)
    subprocess.run(["tar", "--zstd", "-xf", str(tarball), "-C", str(target)], check=True)
    return target


class Container:
    """One booted container."""

    def __init__(self, root: Path, binds: dict[str, str]) -> None:
        self.root = root
        self.binds = binds
        self.name = f"yadtq-{uuid.uuid4().hex[:8]}"
        self.process: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.log = root.parent / "nspawn.log"

    def boot(self, timeout: float = 120.0) -> None:
        """Boot and wait until systemd reports the system up."""
        for base in CGROUP_ROOTS:
            (base / self.name).mkdir()
        binds = [f"--bind-ro={host}:{inside}" for host, inside in self.binds.items()]
        nspawn = ["systemd-nspawn", "--boot", f"--directory={self.root}", "--register=no",
                  "--keep-unit", "--link-journal=no", "--console=read-only",
                  f"--machine={self.name}", *binds]
        enter = "".join(f"echo $$ > {base / self.name}/cgroup.procs; " for base in CGROUP_ROOTS)
        self.process = subprocess.Popen(["sh", "-c", enter + 'exec "$@"', "nspawn", *nspawn],
                                        stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"nspawn exited:\n{self.log.read_text(errors='replace')}")
            self.leader = self._leader()
            if self.leader:
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"container did not boot:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.2)  # boot progress has no event we can wait on from outside

    def _leader(self) -> int:
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            pids = children.read_text().split()
        except OSError:
            return 0
        return int(pids[0]) if pids else 0

    def run(self, *command: str, check: bool = True, timeout: float = 180.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container as root."""
        done = subprocess.run(["nsenter", f"--target={self.leader}", "--all", "env", "-i", PATH,
                               *command], capture_output=True, text=True, timeout=timeout,
                              input=input)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {done.returncode}:\n"
                                 f"{done.stdout}{done.stderr}")
        return done

    def poweroff(self) -> None:
        """Shut the container down and remove its cgroups."""
        if self.process is not None and self.process.poll() is None:
            self.run("systemctl", "poweroff", check=False)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for base in CGROUP_ROOTS:
            _remove_cgroup(base / self.name)


def _remove_cgroup(path: Path) -> None:
    if not path.exists():
        return
    for child in [p for p in path.iterdir() if p.is_dir()]:
        _remove_cgroup(child)
    try:
        os.rmdir(path)
    except OSError:
        pass
