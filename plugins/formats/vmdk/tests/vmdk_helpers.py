"""Shared helpers for the vmdk tests: creating images with blockgraph and running the real qemu tools."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from blockgraph.backend import BlockBackend
from blockgraph.cli.img_create import build_options
from blockgraph.session import Session

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
BLOCKGRAPH = Path(sys.executable).parent / "blockgraph"
needs_qemu = pytest.mark.skipif(not (QEMU_IMG and QEMU_IO), reason="qemu-img/qemu-io not installed")
SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized")


def bg_create(path: Path, size: int, **opts: Any) -> None:
    """``img create -f vmdk`` through the driver's create classmethod."""

    async def go() -> None:
        session = Session()
        try:
            cls = session.registry.driver("vmdk")
            await cls.create(session, str(path), build_options(cls, {"size": size, **opts}))
        finally:
            await session.close()

    asyncio.run(go())


async def open_blk(session: Session, path: Path, *, read_only: bool = False, **options: Any) -> BlockBackend:
    node = await session.open_node({"driver": "vmdk", "read-only": read_only,
                                    "file": {"driver": "file", "filename": str(path)}, **options})
    return await BlockBackend.attach_new(session, node, read_only=read_only)


def run(*argv: str | Path, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=check, timeout=120, cwd=cwd)


def qemu_raw(image: Path, out: Path) -> bytes:
    run(QEMU_IMG, "convert", "-O", "raw", image, out)
    return out.read_bytes()


def bg_read_all(path: Path, **options: Any) -> bytes:
    async def go() -> bytes:
        session = Session()
        try:
            blk = await open_blk(session, path, read_only=True, **options)
            buf = bytearray(blk.getlength())
            step = 1 << 20
            for off in range(0, len(buf), step):
                await blk.preadv(off, memoryview(buf)[off:off + step])
            return bytes(buf)
        finally:
            await session.close()

    return asyncio.run(go())
