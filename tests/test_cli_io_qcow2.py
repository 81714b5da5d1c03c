"""qemu-io commands that need a format with overlays or compression: ``-s`` and ``write -c`` (qcow2)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_snapshot_writes_go_to_a_temporary_overlay(tmp_path: Path) -> None:
    """-s: the session sees its writes, the image never does, and no overlay file is left behind."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    tmpdir = tmp_path / "t"
    tmpdir.mkdir()
    out = subprocess.run([sys.executable, "-m", "blockgraph.cli.main", "io", "-f", "raw", "-s",
                          "-c", "write -P 7 0 4k", "-c", "read -P 7 0 4k", str(img)],
                         capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmpdir)})
    assert out.returncode == 0, out.stderr
    assert "Pattern verification failed" not in out.stdout and "read 4096/4096" in out.stdout
    assert img.read_bytes() == bytes(1 << 20)
    assert list(tmpdir.iterdir()) == []


def test_write_compressed_matches_qemu_io(tmp_path: Path) -> None:
    """write -c: whole clusters are stored compressed; partial ones and formats without compression fail alike."""
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io (Debian qemu-utils) not installed")
    cmds = ["write -c 0 64k", "write -c 100k 4k", "write -c 960k 64k"]
    outputs = []
    for tool in ("qemu", "blockgraph"):
        img = tmp_path / f"{tool}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
        prog = ["qemu-io"] if tool == "qemu" else [sys.executable, "-m", "blockgraph.cli.main", "io"]
        out = subprocess.run([*prog, *[a for c in cmds for a in ("-c", c)], str(img)], capture_output=True,
                             text=True)
        outputs.append([line for line in out.stdout.splitlines() if "ops; " not in line])
        check = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
        assert "2/16 = 12.50% allocated" in check.stdout and "100.00% compressed" in check.stdout
    assert outputs[0] == outputs[1]
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(1 << 20))
    out = subprocess.run([sys.executable, "-m", "blockgraph.cli.main", "io", "-f", "raw", "-c", "write -c 0 64k",
                          str(raw)], capture_output=True, text=True)
    assert out.stdout.strip() == "write failed: Operation not supported"
