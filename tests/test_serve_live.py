"""Live work on a running ``blockgraph serve``: a client keeps writing (qemu-io through
human-monitor-command) while another shuts the daemon down or changes the graph; every write that
was acknowledged is on disk afterwards (checked with qemu-io, qemu-img compare and qemu-img check)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import qemu.qmp as qmp_mod  # the test extra; CI installs it
from blockgraph.daemon.harness import ServeProcess

QMPClient = qmp_mod.QMPClient
CHUNK = 65536
OVERLAY_NO_BACKING = '{"driver": "qcow2", "file": "f1", "node-name": "ov", "backing": null}'
MiB = 1 << 20


def pattern(i: int) -> int:
    return 0x10 + i % 0xE0


async def hmp(qmp: Any, device: str, line: str) -> str:
    return await qmp.execute("human-monitor-command", {"command-line": f'qemu-io {device} "{line}"'})


async def writer(sock: str, device: Any, acked: list[int], stop: asyncio.Event, count: int) -> None:
    """Write chunk i with pattern(i) until told to stop; record i once the daemon acknowledged it."""
    qmp = QMPClient("writer")
    await qmp.connect(sock)
    try:
        for i in range(count):
            if stop.is_set():
                return
            dev = device() if callable(device) else device
            out = await hmp(qmp, dev, f"write -P {pattern(i)} {i * CHUNK} {CHUNK}")
            assert out.startswith(f"wrote {CHUNK}/{CHUNK}"), out
            acked.append(i)
    except (qmp_mod.ConnectError, qmp_mod.ExecInterruptedError, EOFError, OSError):
        return  # the daemon went away under us: what was acknowledged must still be there
    finally:
        try:
            await qmp.disconnect()
        except (EOFError, OSError):
            pass


def qemu_io_reads(img: Path, fmt: str, acked: list[int]) -> None:
    cmds = [x for i in acked for x in ("-c", f"read -P {pattern(i)} {i * CHUNK} {CHUNK}")]
    r = subprocess.run(["qemu-io", "-r", "-f", fmt, *cmds, str(img)], capture_output=True, text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr


def reference_compare(img: Path, fmt: str, acked: list[int], tmp: Path, size: int) -> None:
    """qemu-img compare against a reference holding the acknowledged writes (and a write in flight at the
    stop, if it landed whole)."""
    ref = tmp / "ref.raw"
    data = bytearray(size)
    for i in acked:
        data[i * CHUNK:(i + 1) * CHUNK] = bytes([pattern(i)]) * CHUNK
    nxt = (max(acked) + 1) if acked else 0
    if (nxt + 1) * CHUNK <= size:
        r = subprocess.run(["qemu-io", "-r", "-f", fmt, "-c", f"read -P {pattern(nxt)} {nxt * CHUNK} {CHUNK}",
                            str(img)], capture_output=True, text=True)
        if "Pattern verification failed" not in r.stdout:
            data[nxt * CHUNK:(nxt + 1) * CHUNK] = bytes([pattern(nxt)]) * CHUNK
    ref.write_bytes(data)
    r = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "raw", str(img), str(ref)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("how", ["sigterm", "quit"])
def test_shutdown_with_a_writer_active_keeps_every_acknowledged_write(tmp_path: Path, how: str) -> None:
    img = tmp_path / "w.raw"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    acked: list[int] = []
    with ServeProcess(tmp_path, ["--blockdev", f"driver=file,filename={img},node-name=f",
                                 "--blockdev", "raw,file=f,node-name=disk"]) as d:
        async def main() -> None:
            stop = asyncio.Event()
            task = asyncio.ensure_future(writer(d.socket, "disk", acked, stop, 64))
            while len(acked) < 8:
                await asyncio.sleep(0.01)
            if how == "sigterm":
                os.kill(d.proc.pid, signal.SIGTERM)
            else:
                qmp = QMPClient("quitter")
                await qmp.connect(d.socket)
                await qmp.execute("quit")
                try:
                    await qmp.disconnect()
                except (EOFError, OSError):
                    pass  # the daemon closes the connection once it has replied
            await task

        asyncio.run(main())
        assert d.wait() == 0
    assert 8 <= len(acked) < 64
    qemu_io_reads(img, "raw", acked)
    reference_compare(img, "raw", acked, tmp_path, 4 * MiB)


def test_snapshot_sync_between_writes_keeps_every_write(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(4 * MiB)], check=True)
    acked: list[int] = []
    current = ["q0"]
    with ServeProcess(tmp_path, ["--blockdev", f"driver=file,filename={base},node-name=f0",
                                 "--blockdev", "qcow2,file=f0,node-name=q0"]) as d:
        async def main() -> None:
            stop = asyncio.Event()
            task = asyncio.ensure_future(writer(d.socket, lambda: current[0], acked, stop, 40))
            while len(acked) < 10:
                await asyncio.sleep(0.01)
            qmp = QMPClient("snapshotter")
            await qmp.connect(d.socket)
            await qmp.execute("blockdev-snapshot-sync", {"node-name": "q0", "snapshot-file": str(top),
                                                         "snapshot-node-name": "ov", "format": "qcow2"})
            current[0] = "ov"
            nodes = {n["node-name"]: n for n in await qmp.execute("query-named-block-nodes")}
            await task
            await qmp.disconnect()
            assert nodes["ov"]["backing_file_depth"] == 1 and nodes["ov"]["backing_file"] == str(base)
            assert nodes["ov"]["image"]["backing-image"]["filename"] == str(base)

        asyncio.run(main())
        assert d.stop() == 0
    assert len(acked) == 40
    qemu_io_reads(top, "qcow2", acked)
    reference_compare(top, "qcow2", acked, tmp_path, 4 * MiB)
    for img in (base, top):
        assert subprocess.run(["qemu-img", "check", "-q", str(img)]).returncode == 0
    info = subprocess.run(["qemu-img", "info", str(top)], capture_output=True, text=True).stdout
    assert f"backing file: {base}" in info


def test_blockdev_snapshot_attaches_an_existing_overlay(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(MiB)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 0 64k", str(base)], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)],
                   check=True)
    with ServeProcess(tmp_path, ["--blockdev", f"driver=file,filename={base},node-name=f0",
                                 "--blockdev", "qcow2,file=f0,node-name=q0",
                                 "--blockdev", f"driver=file,filename={top},node-name=f1",
                                 "--blockdev", OVERLAY_NO_BACKING]) as d:
        async def main() -> list[Any]:
            qmp = QMPClient("snap")
            await qmp.connect(d.socket)
            try:
                errors = []
                for args in ({"node": "q0", "overlay": "zz"}, {"node": "q0", "overlay": "f0"}):
                    with pytest.raises(qmp_mod.ExecuteError) as e:
                        await qmp.execute("blockdev-snapshot", args)
                    errors.append(str(e.value))
                await qmp.execute("blockdev-snapshot", {"node": "q0", "overlay": "ov"})
                read = await hmp(qmp, "ov", "read -P 0x44 0 64k")
                wrote = await hmp(qmp, "ov", "write -P 0x55 64k 64k")
                graph = await qmp.execute("x-debug-query-block-graph")
                return [errors, read, wrote, graph]
            finally:
                await qmp.disconnect()

        errors, read, wrote, graph = asyncio.run(main())
        assert d.stop() == 0
    assert errors[0] == "Cannot find device='zz' nor node-name='zz'"
    assert errors[1] == "The overlay is already in use"
    assert read.startswith("read 65536/65536") and wrote.startswith("wrote 65536/65536")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    assert ("ov", "q0", "backing") in {(names[e["parent"]], names[e["child"]], e["name"]) for e in graph["edges"]}
    r = subprocess.run(["qemu-io", "-r", "-c", "read -P 0x44 0 64k", "-c", "read -P 0x55 64k 64k", str(top)],
                       capture_output=True, text=True)
    assert "Pattern verification failed" not in r.stdout and r.returncode == 0


def test_internal_snapshot_create_and_delete(tmp_path: Path) -> None:
    img = tmp_path / "i.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(MiB)], check=True)
    with ServeProcess(tmp_path, ["--blockdev", f"driver=file,filename={img},node-name=f0",
                                 "--blockdev", "qcow2,file=f0,node-name=q0"]) as d:
        async def main() -> list[Any]:
            qmp = QMPClient("isnap")
            await qmp.connect(d.socket)
            try:
                await qmp.execute("blockdev-snapshot-internal-sync", {"device": "q0", "name": "keep"})
                await qmp.execute("blockdev-snapshot-internal-sync", {"device": "q0", "name": "gone"})
                with pytest.raises(qmp_mod.ExecuteError) as dup:
                    await qmp.execute("blockdev-snapshot-internal-sync", {"device": "q0", "name": "keep"})
                deleted = await qmp.execute("blockdev-snapshot-delete-internal-sync",
                                            {"device": "q0", "name": "gone"})
                with pytest.raises(qmp_mod.ExecuteError) as missing:
                    await qmp.execute("blockdev-snapshot-delete-internal-sync", {"device": "q0", "name": "gone"})
                return [str(dup.value), deleted, str(missing.value)]
            finally:
                await qmp.disconnect()

        dup, deleted, missing = asyncio.run(main())
        assert d.stop() == 0
    assert dup == "Snapshot with name 'keep' already exists on device 'q0'"
    assert deleted["name"] == "gone" and set(deleted) >= {"id", "name", "vm-state-size", "date-sec", "date-nsec",
                                                          "vm-clock-sec", "vm-clock-nsec"}
    assert missing == "Snapshot with id 'null' and name 'gone' does not exist on device 'q0'"
    listing = subprocess.run(["qemu-img", "snapshot", "-l", str(img)], capture_output=True, text=True).stdout
    assert "keep" in listing and "gone" not in listing
    assert subprocess.run(["qemu-img", "check", "-q", str(img)]).returncode == 0
