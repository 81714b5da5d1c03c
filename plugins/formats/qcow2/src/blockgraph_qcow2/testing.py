"""Test helpers (used by this plugin's tests and the qcow2-tools ones): create images with blockgraph or qemu-img."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

from blockgraph.options import structure
from blockgraph.session import Session

from .driver import Qcow2Driver

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
HAVE_QEMU = bool(QEMU_IMG and QEMU_IO)


def bg_create(path: Path, size: int, **opts: Any) -> Path:
    """Create a qcow2 image with blockgraph's own create()."""
    values = {"size": size, **{k.replace("__", "."): v for k, v in opts.items()}}

    async def run() -> None:
        session = Session()
        try:
            await Qcow2Driver.create(session, str(path), structure(Qcow2Driver.CreateOptions, values))
        finally:
            await session.close()

    asyncio.run(run())
    return path


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IMG, *args], capture_output=True, text=True, check=check)


def qemu_io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    argv = [QEMU_IO, "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run([*argv, str(path)], capture_output=True, text=True, check=True)
    assert "failed" not in r.stdout + r.stderr, r.stdout + r.stderr
