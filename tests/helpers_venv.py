"""Fresh virtual environments for tests that prove what an installation contains."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def make_venv(path: Path, *installs: str) -> Path:
    """Create a venv at ``path`` with ``installs`` (paths or requirements); return its bin folder.

    uv when it is on PATH (seconds), pip otherwise.
    """
    uv = shutil.which("uv")
    if uv:
        subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(path)], check=True)
        subprocess.run([uv, "pip", "install", "-q", "--python", str(path / "bin/python"), *installs], check=True)
    else:
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(path / "bin/pip"), "install", "-q", *installs], check=True)
    return path / "bin"
