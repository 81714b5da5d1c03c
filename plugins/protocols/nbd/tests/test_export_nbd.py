"""The ``nbd`` export type and the nbd-server-* commands in ``blockgraph serve``, compared with
qemu-storage-daemon running the same QMP sequence, and served to real NBD clients."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import qemu.qmp as qmp_mod  # the test extra; CI installs it
from blockgraph.daemon.harness import QSD, ServeProcess

QMPClient, ExecuteError = qmp_mod.QMPClient, qmp_mod.ExecuteError
if "/usr/lib/python3/dist-packages" not in sys.path:
    sys.path.append("/usr/lib/python3/dist-packages")
try:
    import nbd
except ImportError:  # pragma: no cover - depends on the host
    nbd = None

pytestmark = pytest.mark.interop
MiB = 1 << 20
PROGRAMS = {"blockgraph": None, "qemu-storage-daemon": QSD}


def programs() -> list[Any]:
    return [pytest.param(name, marks=pytest.mark.skipif(
        name != "blockgraph" and shutil.which(QSD[0]) is None, reason=f"{QSD[0]} is not installed"))
        for name in PROGRAMS]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "a.raw"
    path.write_bytes(b"\x5a" * MiB)
    return path


def start(tmp_path: Path, image: Path, program: str) -> ServeProcess:
    return ServeProcess(tmp_path, ["--blockdev", f"driver=file,filename={image},node-name=fa"],
                        program=PROGRAMS[program])


async def execute(qmp: Any, cmd: str, args: dict[str, Any] | None = None) -> Any:
    try:
        return await qmp.execute(cmd, args)
    except ExecuteError as e:
        return ("error", e.error_class, str(e))


def script(sock: str, nbd_sock: str) -> list[Any]:
    """A QMP session through every nbd command and their errors; returns what each step answered."""

    async def main() -> list[Any]:
        qmp = QMPClient("nbd-test")
        await qmp.connect(sock)
        steps = [
            ("nbd-server-add", {"device": "fa"}),
            ("nbd-server-stop", None),
            ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd_sock}}}),
            ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd_sock + "2"}}}),
            ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "fa", "writable": True, "name": "disk",
                                  "description": "the disk"}),
            ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "fa", "name": "disk"}),
            ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "fa"}),
            ("block-export-add", {"type": "nbd", "id": "e5", "node-name": "fa", "bogus": 1}),
            ("nbd-server-add", {"device": "fa", "name": "legacy"}),
            ("nbd-server-add", {"device": "fa", "name": "legacy"}),
            ("query-block-exports", None),
            ("nbd-server-remove", {"name": "nope"}),
            ("nbd-server-remove", {"name": "legacy"}),
            ("block-export-del", {"id": "e1"}),
            ("query-block-exports", None),
            ("nbd-server-stop", None),
            ("query-block-exports", None),
        ]
        out = []
        try:
            for cmd, args in steps:
                r = await execute(qmp, cmd, args)
                out.append(sorted(r, key=lambda e: e["id"]) if cmd == "query-block-exports" else r)
        finally:
            await qmp.disconnect()
        return out

    return asyncio.run(main())


def test_nbd_commands_answer_as_qemu_storage_daemon(tmp_path: Path, image: Path) -> None:
    results = {}
    for program in PROGRAMS:
        if PROGRAMS[program] is not None and shutil.which(QSD[0]) is None:
            continue
        work = tmp_path / program.replace("-", "_")
        work.mkdir()
        with start(work, image, program) as d:
            results[program] = script(d.socket, str(work / "nbd.sock"))
    ours = results["blockgraph"]
    assert ours[0] == ("error", "GenericError", "NBD server not running")
    assert ours[3] == ("error", "GenericError", "NBD server already running")
    assert ours[5] == ("error", "GenericError", "NBD server already has export named 'disk'")
    assert ours[10] == [{"id": "e1", "node-name": "fa", "shutting-down": False, "type": "nbd"},
                        {"id": "legacy", "node-name": "fa", "shutting-down": False, "type": "nbd"}]
    assert ours[-1] == []
    if "qemu-storage-daemon" in results:
        assert ours == results["qemu-storage-daemon"]


def test_bitmaps_are_refused_with_a_reason(tmp_path: Path, image: Path) -> None:
    with start(tmp_path, image, "blockgraph") as d:
        async def main() -> Any:
            qmp = QMPClient("nbd-test")
            await qmp.connect(d.socket)
            try:
                await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "path": str(tmp_path / "n.sock")}})
                return await execute(qmp, "block-export-add", {"type": "nbd", "id": "b", "node-name": "fa",
                                                                "bitmaps": ["bm"]})
            finally:
                await qmp.disconnect()

        res = asyncio.run(main())
    assert res[0] == "error" and res[2].startswith("Bitmap 'bm' is not found")  # QEMU's text, then why


@pytest.mark.skipif(nbd is None, reason="libnbd's Python bindings are not importable")
@pytest.mark.parametrize("program", programs())
def test_safe_and_hard_removal_with_connected_clients(tmp_path: Path, image: Path, program: str) -> None:
    nbd_sock = str(tmp_path / "nbd.sock")
    with start(tmp_path, image, program) as d:
        async def main() -> list[Any]:
            qmp = QMPClient("nbd-test")
            await qmp.connect(d.socket)
            out: list[Any] = []
            try:
                await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd_sock}},
                                                       "max-connections": 2})
                await qmp.execute("block-export-add", {"type": "nbd", "id": "e1", "node-name": "fa", "name": "disk"})
                await qmp.execute("nbd-server-add", {"device": "fa", "name": "two", "writable": True})
                h1, h2 = nbd.NBD(), nbd.NBD()
                h1.connect_uri(f"nbd+unix:///disk?socket={nbd_sock}")
                h2.connect_uri(f"nbd+unix:///two?socket={nbd_sock}")
                out.append((h1.can_multi_conn(), h1.is_read_only(), h2.is_read_only(), h1.pread(4, 0)))
                out.append(await execute(qmp, "block-export-del", {"id": "e1"}))
                out.append(await execute(qmp, "nbd-server-remove", {"name": "two"}))
                out.append(await execute(qmp, "block-export-del", {"id": "e1", "mode": "hard"}))
                await asyncio.sleep(0.2)
                out.append(await execute(qmp, "query-block-exports"))
                with pytest.raises(nbd.Error):
                    h1.pread(4, 0)
                h2.pwrite(b"\x01\x02", 0)
                out.append(await execute(qmp, "nbd-server-stop"))
                out.append(await execute(qmp, "query-block-exports"))
                with pytest.raises(nbd.Error):
                    h2.pread(4, 0)
            finally:
                await qmp.disconnect()
            return out

        out = asyncio.run(main())
    assert out == [
        (True, True, False, b"\x5a" * 4),
        ("error", "GenericError", "export 'e1' still in use"),
        ("error", "GenericError", "export 'two' still in use"),
        {},
        [{"id": "two", "node-name": "fa", "shutting-down": False, "type": "nbd"}],
        {},
        [],
    ]
    assert image.read_bytes()[:3] == b"\x01\x02\x5a"


@pytest.mark.skipif(shutil.which("nbdinfo") is None, reason="nbdinfo is not installed")
def test_export_option_of_serve_reaches_nbdinfo(tmp_path: Path, image: Path) -> None:
    nbd_sock = tmp_path / "nbd.sock"
    args = ["--blockdev", f"driver=file,filename={image},node-name=fa",
            "--nbd-server", f"addr.type=unix,addr.path={nbd_sock},max-connections=1",
            "--export", "type=nbd,id=e,node-name=fa,name=disk,description=served,allocation-depth=on"]
    with ServeProcess(tmp_path, args):
        out = subprocess.run(["nbdinfo", f"nbd+unix:///disk?socket={nbd_sock}"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    assert "description: served" in out
    assert "export-size: 1048576" in out
    assert "qemu:allocation-depth" in out
    assert "is_read_only: true" in out and "can_multi_conn: false" in out
