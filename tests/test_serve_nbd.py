"""``blockgraph serve`` with a --drive exported over NBD (blockgraph-nbd): a real client (qemu-io over
nbd+unix) keeps writing while the monitor adds an overlay or the daemon is stopped; every write the client
saw acknowledged is in the image afterwards."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import qemu.qmp as qmp_mod  # the test extra; CI installs it
from blockgraph.daemon.harness import ServeProcess

CHUNK = 65536
MiB = 1 << 20
WROTE = re.compile(r"^wrote 65536/65536 bytes at offset (\d+)$", re.M)


def pattern(i: int) -> int:
    return 0x20 + i % 0xD0


def start_writer(sock: Path, first: int, count: int, pause_ms: int) -> subprocess.Popen:
    cmds = [x for i in range(first, first + count)
            for x in ("-c", f"write -P {pattern(i)} {i * CHUNK} {CHUNK}", "-c", f"sleep {pause_ms}")]
    return subprocess.Popen(["qemu-io", "-f", "raw", *cmds, f"nbd+unix:///disk?socket={sock}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def warm_up(sock: Path) -> list[int]:
    """A first client writes chunks 0..7 to the end, so the next one starts on a live, written export."""
    w = start_writer(sock, 0, 8, 0)
    out, err = w.communicate(timeout=60)
    assert w.returncode == 0, err
    return acked(out)


def acked(out: str) -> list[int]:
    return [int(m) // CHUNK for m in WROTE.findall(out)]


def verify(img: Path, indexes: list[int]) -> None:
    cmds = [x for i in indexes for x in ("-c", f"read -P {pattern(i)} {i * CHUNK} {CHUNK}")]
    r = subprocess.run(["qemu-io", "-r", *cmds, str(img)], capture_output=True, text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    assert subprocess.run(["qemu-img", "check", "-q", str(img)]).returncode == 0


def serve_args(tmp: Path, img: Path) -> list[str]:
    return ["--drive", f"if=none,id=drive0,file={img},format=qcow2",
            "--nbd-server", f"addr.type=unix,addr.path={tmp / 'nbd.sock'}",
            "--export", "type=nbd,id=e0,node-name=drive0,name=disk,writable=on"]


async def execute(sock: str, cmd: str, args: dict | None = None) -> Any:
    qmp = qmp_mod.QMPClient("nbd-test")
    await qmp.connect(sock)
    try:
        return await qmp.execute(cmd, args)
    finally:
        await qmp.disconnect()


def test_snapshot_sync_while_an_nbd_client_writes(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(4 * MiB)], check=True)
    with ServeProcess(tmp_path, serve_args(tmp_path, base)) as d:
        first = warm_up(tmp_path / "nbd.sock")
        writer = start_writer(tmp_path / "nbd.sock", 8, 40, 5)
        asyncio.run(execute(d.socket, "blockdev-snapshot-sync", {"device": "drive0", "snapshot-file": str(top),
                                                                 "format": "qcow2"}))
        out, err = writer.communicate(timeout=60)
        blocks = asyncio.run(execute(d.socket, "query-block"))
        commands = {c["name"] for c in asyncio.run(execute(d.socket, "query-commands"))}
        assert d.stop() == 0
    assert writer.returncode == 0, err
    assert {"nbd-server-start", "nbd-server-stop", "block-export-add"} <= commands  # plugin commands listed
    assert first + acked(out) == list(range(48))
    assert blocks[0]["inserted"]["image"]["filename"] == str(top)
    assert blocks[0]["inserted"]["backing_file_depth"] == 1
    verify(top, first + acked(out))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_an_nbd_client_writes_keeps_acknowledged_writes(tmp_path: Path, sig: int) -> None:
    img = tmp_path / "w.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(4 * MiB)], check=True)
    with ServeProcess(tmp_path, serve_args(tmp_path, img)) as d:
        first = warm_up(tmp_path / "nbd.sock")
        writer = start_writer(tmp_path / "nbd.sock", 8, 56, 10)
        d.proc.send_signal(sig)
        out, _ = writer.communicate(timeout=60)
        assert d.wait() == 0
    done = first + acked(out)
    assert done == list(range(len(done)))
    verify(img, done)
