"""The file and host_device drivers against the driver contract (blockgraph.testing)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from blockgraph.testing import DriverContract, Harness


def sparse_image(tmp_path: Path, size: int, name: str = "disk.img") -> Path:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


class TestFile(DriverContract):
    driver = "file"
    persistent = True
    discard_reads_zero = True  # discard punches a hole, which reads as zeros
    # aio=native is refused by the driver itself (it needs cache.direct=on); the others by core's parser.
    invalid_options = {"aio": "native", "locking": "maybe", "drop-cache": "sometimes"}

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        return {"filename": str(sparse_image(tmp_path, size))}


class TestFileDirect(TestFile):
    """cache.direct=on: O_DIRECT alignment, so unaligned requests go through core's read-modify-write."""

    invalid_options = {"aio": "bogus", "locking": "maybe"}

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        path = sparse_image(tmp_path, size)
        try:
            os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            pytest.skip(f"the file system under {tmp_path} does not support O_DIRECT")
        return {"filename": str(path), "cache": {"direct": True}}


class TestHostDevice(DriverContract):
    """host_device on a loop device: devices cannot grow, so truncate must be refused."""

    driver = "host_device"
    persistent = True
    supports_truncate = False

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        backing = sparse_image(tmp_path, size, "backing.img")
        if not shutil.which("losetup"):
            pytest.skip("losetup is not installed")
        out = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot attach a loop device here: {out.stderr.strip()}")
        self.loop = out.stdout.strip()
        return {"filename": self.loop}

    def cleanup(self, harness: Harness) -> None:
        loop = getattr(self, "loop", None)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        super().cleanup(harness)
