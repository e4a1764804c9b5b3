"""The gateway's state directory (`--data-dir`): pki/, users.yaml, history.sqlite3, audit.log, models/."""

from __future__ import annotations

import os
from pathlib import Path


def prepare_data_dir(path: Path) -> Path:
    """The state directory, created private (0700)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
