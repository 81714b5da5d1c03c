"""block-export-add / query-block-exports on the real qemu-storage-daemon and on ``blockgraph serve``: the same
error text for an unknown node and the same export order (newest first)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
import qemu.qmp as qmp_mod  # the test extra; CI installs it
from blockgraph.daemon.harness import QSD, ServeProcess

pytestmark = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                                reason="qemu-storage-daemon (Debian qemu-system-common) not installed")


async def session(sock: str, d: Path) -> dict[str, Any]:
    qmp = qmp_mod.QMPClient("exports")
    await qmp.connect(sock)
    out: dict[str, Any] = {}
    try:
        await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(d / "nbd.sock")}}})
        try:
            await qmp.execute("block-export-add", {"type": "nbd", "id": "x", "node-name": "nope"})
        except qmp_mod.ExecuteError as e:
            out["unknown"] = (e.error.error.class_, e.error.error.desc)
        for i in ("e1", "e2", "e3"):
            await qmp.execute("block-export-add", {"type": "nbd", "id": i, "node-name": "nul", "name": i})
        out["exports"] = await qmp.execute("query-block-exports")
        await qmp.execute("block-export-del", {"id": "e2"})
        await qmp.execute("block-export-add", {"type": "nbd", "id": "e4", "node-name": "nul", "name": "e4"})
        out["after"] = await qmp.execute("query-block-exports")
    finally:
        await qmp.disconnect()
    return out


def test_export_errors_and_order_as_qsd(tmp_path: Path) -> None:
    args = ["--blockdev", "null-co,node-name=nul,size=65536"]
    results = []
    for program, sub in ((QSD, "qsd"), (None, "bg")):
        (tmp_path / sub).mkdir()
        with ServeProcess(tmp_path / sub, args, program=program) as proc:
            results.append(asyncio.run(session(proc.socket, tmp_path / sub)))
            assert proc.stop() == 0
    theirs, ours = results
    assert ours == theirs
    assert ours["unknown"] == ("GenericError", "Cannot find device='' nor node-name='nope'")
    assert [e["id"] for e in ours["exports"]] == ["e3", "e2", "e1"]
