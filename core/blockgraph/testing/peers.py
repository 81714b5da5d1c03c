"""Helpers for interop tests against the real tools: run them, run ``blockgraph`` in-process, round-trip images.

A driver plugin's tests use these to compare with qemu-img/qemu-io (see plugins/formats/*/tests):

    from blockgraph.testing.peers import bg, needs_qemu, run

    @needs_qemu
    def test_reads_like_qemu(tmp_path):
        run("qemu-img", "create", "-q", "-f", "myfmt", tmp_path / "a.img", "1M")
        assert bg("img", "info", tmp_path / "a.img").returncode == 0
"""

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

from ..backend import BlockBackend
from ..session import Session

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
BG = str(Path(sys.executable).parent / "blockgraph")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None or QEMU_IO is None,
                                reason="qemu-img/qemu-io (Debian qemu-utils) are not installed")


def run(*cmd: str | Path, ok: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command; with ``ok`` a non-zero exit fails the test, showing its output."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def bg(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess:
    """``blockgraph ARGS...`` in this process (a subprocess would cost a Python start-up per call)."""
    from ..cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    proc = subprocess.CompletedProcess([BG, *map(str, args)], rc, out.getvalue(), err.getvalue())
    if ok and rc != 0:
        raise AssertionError(f"blockgraph {args} failed ({rc}): {proc.stdout}{proc.stderr}")
    return proc


def commands(cmds: list[str]) -> list[str]:
    """``-c CMD`` for each command, for qemu-io and ``blockgraph io``."""
    return [arg for c in cmds for arg in ("-c", c)]


async def _with_backend(spec: dict[str, Any], fn: Any, read_only: bool) -> Any:
    session = Session()
    try:
        node = await session.open_node({**spec, "read-only": read_only})
        blk = await BlockBackend.attach_new(session, node, read_only=read_only)
        return await fn(blk, node)
    finally:
        await session.close()


def with_image(path: Path | str, fn: Any, *, fmt: str, read_only: bool = False,
               extra: dict[str, Any] | None = None) -> Any:
    """``await fn(blk, node)`` on the image opened with a BlockBackend, in a session of its own."""
    spec = {"driver": fmt, "file": {"driver": "file", "filename": str(path)}, **(extra or {})}
    return asyncio.run(_with_backend(spec, fn, read_only))


def read_all(path: Path | str, *, fmt: str, extra: dict[str, Any] | None = None) -> bytes:
    """The whole guest-visible content of an image, read through blockgraph."""
    async def go(blk: BlockBackend, node: Any) -> bytes:
        buf = bytearray(blk.getlength())
        await blk.preadv(0, memoryview(buf))
        return bytes(buf)

    return with_image(path, go, fmt=fmt, read_only=True, extra=extra)


def write_at(path: Path | str, writes: list[tuple[int, bytes]], *, fmt: str) -> None:
    """Write ``(offset, data)`` pairs through blockgraph, then flush."""
    async def go(blk: BlockBackend, node: Any) -> None:
        for off, data in writes:
            await blk.pwritev(off, memoryview(data))
        await blk.flush()

    with_image(path, go, fmt=fmt)


def create(path: Path | str, size: int | str, *, fmt: str, **opts: str) -> None:
    """``blockgraph img create -f FMT -o K=V,... PATH SIZE``."""
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    bg("img", "create", "-q", "-f", fmt, *(["-o", o] if o else []), str(path), str(size))


def qemu_raw(path: Path, fmt: str, tmp: Path) -> bytes:
    """What qemu-img reads from the image (``convert -O raw``)."""
    out = tmp / (path.name + ".qemu.raw")
    run(QEMU_IMG or "qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out))
    return out.read_bytes()


def random_writes(size: int, seed: Any, count: int = 12,
                  lengths: tuple[int, ...] = (512, 4096, 65536, 3 << 20)) -> tuple[list[tuple[int, bytes]], bytes]:
    """``count`` sector-aligned writes of random data inside ``size`` bytes (for ``write_at``), and the
    image content they leave on an image that read zeros before."""
    import random

    rnd = random.Random(seed)
    writes = []
    for _ in range(count):
        off = rnd.randrange(0, size - 1) // 512 * 512
        writes.append((off, rnd.randbytes(min(size - off, rnd.choice(lengths)))))
    data = bytearray(size)
    for off, chunk in writes:
        data[off:off + len(chunk)] = chunk
    return writes, bytes(data)


def for_format(fmt: str) -> dict[str, Any]:
    """``with_image``, ``read_all``, ``write_at`` and ``create`` with ``fmt`` as their default format."""
    import functools

    return {f.__name__: functools.partial(f, fmt=fmt) for f in (with_image, read_all, write_at, create)}
