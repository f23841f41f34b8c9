"""The type checker passes over the package and the example plugins (strict mode)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict_passes() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy", "yadtqd", "plugins/arith/yadtq_arith",
                           "plugins/demo/yadtq_demo"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
