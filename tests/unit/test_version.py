"""`cmcs --version` (INTERFACE.md section 2): the installed package's version, exit 0."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version


def test_version_prints_the_installed_package_version():
    proc = subprocess.run([sys.executable, "-m", "gateway", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"cmcs-gateway {version('cmcs-gateway')}"
