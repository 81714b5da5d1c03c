"""Helpers of the vpc tests: the CLIs (ours and QEMU's), image creation, pattern I/O."""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from blockgraph.backend import BlockBackend
from blockgraph.session import Session

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
BG = str(Path(sys.executable).parent / "blockgraph")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None or QEMU_IO is None,
                                reason="qemu-img/qemu-io (Debian qemu-utils) are not installed")


def run(*cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def bg(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    """``blockgraph ARGS...`` in this process (a subprocess would cost a Python start-up per call)."""
    from blockgraph.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    proc = subprocess.CompletedProcess([BG, *args], rc, out.getvalue(), err.getvalue())
    if ok and rc != 0:
        raise AssertionError(f"blockgraph {args} failed ({rc}): {proc.stdout}{proc.stderr}")
    return proc


def arun(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_backend(spec: dict[str, Any], fn: Any, read_only: bool = False) -> Any:
    session = Session()
    try:
        node = await session.open_node({**spec, "read-only": read_only})
        blk = await BlockBackend.attach_new(session, node, read_only=read_only)
        return await fn(blk, node)
    finally:
        await session.close()


def with_image(path: Path | str, fn: Any, *, read_only: bool = False, fmt: str = "vpc",
               extra: dict[str, Any] | None = None) -> Any:
    spec = {"driver": fmt, "file": {"driver": "file", "filename": str(path)}, **(extra or {})}
    return arun(_with_backend(spec, fn, read_only))


def read_all(path: Path | str, fmt: str = "vpc", extra: dict[str, Any] | None = None) -> bytes:
    async def go(blk: BlockBackend, node: Any) -> bytes:
        buf = bytearray(blk.getlength())
        await blk.preadv(0, memoryview(buf))
        return bytes(buf)

    return with_image(path, go, read_only=True, fmt=fmt, extra=extra)


def write_at(path: Path | str, writes: list[tuple[int, bytes]], fmt: str = "vpc") -> None:
    async def go(blk: BlockBackend, node: Any) -> None:
        for off, data in writes:
            await blk.pwritev(off, memoryview(data))
        await blk.flush()

    with_image(path, go, fmt=fmt)


def create(path: Path | str, size: int | str, fmt: str = "vpc", **opts: str) -> None:
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    bg("img", "create", "-q", "-f", fmt, *(["-o", o] if o else []), str(path), str(size))


def qemu_raw(path: Path, fmt: str, tmp: Path) -> bytes:
    out = tmp / (path.name + ".qemu.raw")
    run(QEMU_IMG, "convert", "-f", fmt, "-O", "raw", str(path), str(out))
    return out.read_bytes()
