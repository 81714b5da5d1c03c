"""Shared helpers for the vhdx tests: running blockgraph and the real qemu tools."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BLOCKGRAPH = [sys.executable, "-m", "blockgraph.cli.main"]
needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="qemu-img/qemu-io (Debian qemu-utils) not installed")


def run(*cmd: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if ok and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def bg(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return run(*BLOCKGRAPH, *args, ok=ok)


def commands(cmds: list[str]) -> list[str]:
    """``-c CMD`` for each command, for qemu-io and blockgraph io."""
    return [arg for c in cmds for arg in ("-c", c)]
