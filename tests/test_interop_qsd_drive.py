"""``blockgraph serve --drive`` against QEMU itself (qemu-system-x86_64 -M none, which has -drive and QMP;
qemu-storage-daemon has no -drive): query-block and query-blockstats show the same backend."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import qemu.qmp as qmp_mod  # the test extra; CI installs it
from blockgraph.daemon.harness import ServeProcess

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 (Debian qemu-system-x86) not installed")
MiB = 1 << 20
DRIVES = [
    "if=none,id=d0,file={img},format=raw",
    "if=none,id=d1,file={img},format=raw,readonly=on,cache=none",
    "if=none,id=d2,file={img},format=raw,cache=unsafe,detect-zeroes=on,readonly=on",
    "if=none,id=d3,file={img},format=raw,cache=writethrough,readonly=on,rerror=stop,werror=report",
]
INSERTED = ("drv", "file", "ro", "cache", "detect_zeroes", "backing_file_depth", "encrypted", "bps", "iops")


async def query(sock: str) -> dict[str, Any]:
    qmp = qmp_mod.QMPClient("drive")
    await qmp.connect(sock)
    try:
        return {"block": await qmp.execute("query-block"), "stats": await qmp.execute("query-blockstats")}
    finally:
        await qmp.disconnect()


def run_qemu(tmp: Path, drives: list[str]) -> dict[str, Any]:
    sock = tmp / "qemu.sock"
    args = [QEMU, "-M", "none", "-S", "-nodefaults", "-display", "none",
            "-qmp", f"unix:{sock},server=on,wait=off"]
    for d in drives:
        args += ["-drive", d]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        return asyncio.run(query(str(sock)))
    finally:
        proc.kill()
        proc.wait()


def test_query_block_of_drives_matches_qemu(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    with open(img, "wb") as f:
        f.truncate(MiB)
    drives = [d.format(img=img) for d in DRIVES]
    theirs = run_qemu(tmp_path, drives)
    with ServeProcess(tmp_path, [x for d in drives for x in ("--drive", d)]) as proc:
        ours = asyncio.run(query(proc.socket))
        assert proc.stop() == 0
    assert [b["device"] for b in ours["block"]] == [b["device"] for b in theirs["block"]]
    for q, b in zip(theirs["block"], ours["block"], strict=True):
        assert (b["locked"], b["removable"], b["type"]) == (q["locked"], q["removable"], q["type"])
        assert {k: b["inserted"][k] for k in INSERTED} == {k: q["inserted"][k] for k in INSERTED}, q["device"]
        assert b["inserted"]["image"]["virtual-size"] == q["inserted"]["image"]["virtual-size"]
    assert [s["device"] for s in ours["stats"]] == [s["device"] for s in theirs["stats"]]
    for q, b in zip(theirs["stats"], ours["stats"], strict=True):
        assert set(b) == set(q) and set(b["parent"]) == set(q["parent"])
        assert b["parent"]["driver-specific"] == q["parent"]["driver-specific"]
    assert set(ours["stats"][0]["stats"]) >= {"rd_bytes", "wr_bytes", "rd_operations", "wr_operations",
                                              "flush_operations", "failed_rd_operations"}
