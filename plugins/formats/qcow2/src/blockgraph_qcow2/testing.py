"""Test helpers (used by this plugin's tests and the qcow2-tools ones): create images with blockgraph or qemu-img."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockgraph.options import structure
from blockgraph.session import Session

from .driver import Qcow2Driver

if TYPE_CHECKING:
    from blockgraph import sync

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


def random_workload(img: sync.Image, model: bytearray, seed: int, ops: int = 60,
                    sizes: tuple[int, ...] = (1, 511, 4096, 65536, 70001, 300000)) -> None:
    """Random writes, zero writes and discards of the given sizes, mirrored in ``model``."""
    rng = random.Random(seed)
    size = len(model)
    for _ in range(ops):
        kind = rng.random()
        off = rng.randrange(0, size - 1)
        n = min(rng.choice(sizes), size - off)
        if kind < 0.6:
            data = rng.randbytes(n)
            img.write(off, data)
            model[off:off + n] = data
        elif kind < 0.8:
            img.write_zeroes(off, n)
            model[off:off + n] = bytes(n)
        else:
            # Discard may keep data (partial clusters): read back what the image now holds there.
            img.discard(off, n)
            model[off:off + n] = img.read(off, n)
        if rng.random() < 0.2:
            img.flush()


def assert_clean(path: Path) -> None:
    """``qemu-img check`` finds no errors and no leaks."""
    r = qemu_img("check", str(path), check=False)
    assert r.returncode == 0 and "No errors were found on the image." in r.stdout, r.stdout + r.stderr


def assert_same_as(path: Path, model: bytes | bytearray, tmp_path: Path) -> None:
    """``qemu-img compare`` finds the image equal to ``model``."""
    raw = tmp_path / "model.raw"
    raw.write_bytes(bytes(model))
    r = qemu_img("compare", "-f", "raw", "-F", "qcow2", str(raw), str(path), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def kill_after(proc: subprocess.Popen, marker: str, count: int, delay: float) -> list[int]:
    """Read ``proc``'s output until ``count`` lines ``MARKER N`` (or ``DONE``), wait up to ``delay`` seconds,
    SIGKILL it; every N it printed before dying (each one a step it had completed)."""
    import os
    import signal
    import time

    assert proc.stdout is not None
    seen: list[int] = []
    for line in proc.stdout:
        if line.startswith(marker + " "):
            seen.append(int(line.split()[1]))
            if len(seen) >= count:
                time.sleep(random.random() * delay)
                break
        elif line.startswith("DONE"):
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return seen + [int(line.split()[1]) for line in proc.stdout.read().splitlines() if line.startswith(marker + " ")]
