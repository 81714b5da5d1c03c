"""The nbd client against the driver contract, each check on a fresh raw file exported by qemu-nbd."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from blockgraph.testing import DriverContract
from blockgraph.testing.contract import Harness

QEMU_NBD = shutil.which("qemu-nbd")


@pytest.mark.interop
@pytest.mark.skipif(not QEMU_NBD, reason="qemu-nbd missing")
class TestNbdOverQemuNbd(DriverContract):
    driver = "nbd"
    persistent = True  # the export is a file: data survives a reconnect
    discard_reads_zero = True  # --discard=unmap punches holes in the raw file
    invalid_options = {"server.type": "tcp", "reconnect-delay": "-1", "open-timeout": "soon"}

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        image = tmp_path / "export.raw"
        with open(image, "wb") as f:
            f.truncate(size)
        sock = str(tmp_path / "qemu-nbd.sock")
        proc = subprocess.Popen([QEMU_NBD, "-t", "-e", "16", "-k", sock, "-f", "raw", "--discard=unmap",
                                 "--cache=writeback", str(image)], stderr=subprocess.DEVNULL)
        self.procs = [*getattr(self, "procs", []), proc]
        for _ in range(1000):
            with socket.socket(socket.AF_UNIX) as s:
                if s.connect_ex(sock) == 0:
                    break
            assert proc.poll() is None, "qemu-nbd exited"
            time.sleep(0.01)
        return {"server": {"type": "unix", "path": sock}}

    def cleanup(self, harness: Harness) -> None:
        for proc in getattr(self, "procs", []):
            proc.kill()
            proc.wait()
        self.procs = []
