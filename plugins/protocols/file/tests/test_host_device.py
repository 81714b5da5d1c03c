"""host_device on a real block device: a loop device over a temporary file."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import blockgraph
import pytest
from blockgraph.errors import OpenError


def _losetup(path: Path) -> str | None:
    if not shutil.which("losetup"):
        return None
    out = subprocess.run(["losetup", "-f", "--show", str(path)], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    backing = tmp_path / "backing.img"
    backing.write_bytes(b"\x5a" * (8 << 20))
    dev = _losetup(backing)
    if dev is None:
        pytest.skip("cannot attach a loop device here (losetup missing or not permitted)")
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_host_device_reads_writes_and_zeroes(loopdev: tuple[str, Path]) -> None:
    dev, backing = loopdev
    opts = {"driver": "host_device", "filename": dev}
    with blockgraph.open(f"json:{__import__('json').dumps(opts)}") as d:
        assert d.length == 8 << 20
        assert d.read(0, 4) == b"\x5a" * 4
        d.write(4096, b"blockdev" * 512)
        d.write_zeroes(1 << 20, 1 << 20)
        d.flush()
    data = backing.read_bytes()
    assert data[4096:4096 + 4096] == b"blockdev" * 512
    assert data[1 << 20:2 << 20] == bytes(1 << 20)
    assert data[(2 << 20):(2 << 20) + 16] == b"\x5a" * 16


def test_host_device_refuses_a_regular_file(tmp_path: Path) -> None:
    f = tmp_path / "plain.img"
    f.write_bytes(bytes(4096))
    with pytest.raises(OpenError, match="not a block device"):
        blockgraph.open(f'json:{{"driver":"host_device","filename":"{f}"}}')
