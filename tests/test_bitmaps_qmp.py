"""block-dirty-bitmap-* through ``blockgraph serve`` and the real qemu-storage-daemon: the same replies and
errors for a table of cases, the same ``dirty-bitmaps`` in query-named-block-nodes, and writes through an NBD
export marking the same granules."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import qemu.qmp as qmp_mod  # the test extra; CI installs it
from blockgraph.daemon.harness import QSD, ServeProcess

pytestmark = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-img") is None,
                                reason="qemu-storage-daemon / qemu-img (Debian qemu-utils) not installed")

CASES: list[tuple[str, dict[str, Any]]] = [
    ("block-dirty-bitmap-add", {"node": "q", "name": "b0"}),
    ("block-dirty-bitmap-add", {"node": "q", "name": "b0"}),
    ("block-dirty-bitmap-add", {"node": "q", "name": ""}),
    ("block-dirty-bitmap-add", {"node": "nope", "name": "x"}),
    ("block-dirty-bitmap-add", {"node": "q", "name": "g", "granularity": 1000}),
    ("block-dirty-bitmap-add", {"node": "q", "name": "g", "granularity": 256}),
    ("block-dirty-bitmap-add", {"node": "q", "name": "g", "granularity": 1 << 32}),
    ("block-dirty-bitmap-add", {"node": "q", "name": "g3", "granularity": 4096, "disabled": True}),
    ("block-dirty-bitmap-add", {"node": "q", "name": "big", "granularity": 1 << 31}),
    ("block-dirty-bitmap-add", {"node": "r", "name": "p", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "q", "name": "x" * 1024}),
    ("block-dirty-bitmap-add", {"node": "r", "name": "rb"}),
    ("block-dirty-bitmap-add", {"node": "r", "name": "r2", "granularity": 512}),
    ("block-dirty-bitmap-add", {"node": "q", "name": "bad", "foo": 1}),
    ("block-dirty-bitmap-add", {"node": "q"}),
    ("block-dirty-bitmap-add", {"node": "q", "name": 5}),
    ("query-named-block-nodes", {"flat": True}),
    ("block-dirty-bitmap-enable", {"node": "q", "name": "g3"}),
    ("block-dirty-bitmap-disable", {"node": "q", "name": "g3"}),
    ("block-dirty-bitmap-disable", {"node": "q", "name": "zz"}),
    ("block-dirty-bitmap-enable", {"node": "nope", "name": "zz"}),
    ("block-dirty-bitmap-clear", {"node": "q", "name": "zz"}),
    ("block-dirty-bitmap-clear", {"node": "nope", "name": "zz"}),
    ("block-dirty-bitmap-clear", {"node": "q", "name": "b0"}),
    ("block-dirty-bitmap-merge", {"node": "q", "target": "b0", "bitmaps": ["g3"]}),
    ("block-dirty-bitmap-merge", {"node": "q", "target": "b0", "bitmaps": ["zz"]}),
    ("block-dirty-bitmap-merge", {"node": "q", "target": "zz", "bitmaps": ["g3"]}),
    ("block-dirty-bitmap-merge", {"node": "q", "target": "b0", "bitmaps": [{"node": "r", "name": "rb"}]}),
    ("block-dirty-bitmap-merge", {"node": "q", "target": "b0", "bitmaps": [{"node": "nope", "name": "rb"}]}),
    ("block-dirty-bitmap-merge", {"node": "q", "target": "b0", "bitmaps": [{"node": "r", "name": "zz"}]}),
    ("block-dirty-bitmap-merge", {"node": "r", "target": "rb", "bitmaps": ["r2", {"node": "r", "name": "r2"}]}),
    ("block-dirty-bitmap-merge", {"node": "r", "target": "rb", "bitmaps": ["rb"]}),
    ("block-dirty-bitmap-remove", {"node": "q", "name": "zz"}),
    ("block-dirty-bitmap-remove", {"node": "nope", "name": "zz"}),
    ("block-dirty-bitmap-remove", {"node": "q", "name": "g3"}),
    ("block-dirty-bitmap-remove", {"node": "q", "name": "g3"}),
    ("query-named-block-nodes", {"flat": True}),
]
# (offset, length) written through the export; the bitmaps then hold exactly these granules.
WRITES = [(0, 1), (70000, 4096), (1 << 20, 65536), (3 * (1 << 20) + 4095, 2)]


def bitmaps_of(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    return {n["node-name"]: n.get("dirty-bitmaps") for n in nodes}


async def session(sock: str, nbd_sock: str) -> tuple[list[Any], Any]:
    qmp = qmp_mod.QMPClient("bitmaps")
    await qmp.connect(sock)
    out: list[Any] = []
    try:
        for cmd, args in CASES:
            try:
                res = await qmp.execute(cmd, args)
                out.append(["ok", bitmaps_of(res) if cmd.startswith("query") else res])
            except qmp_mod.ExecuteError as e:
                out.append(["error", e.error_class, str(e)])
        await qmp.execute("block-dirty-bitmap-add", {"node": "q", "name": "w", "granularity": 4096})
        await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd_sock}}})
        await qmp.execute("block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "writable": True})
        for off, n in WRITES:
            subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 7 {off} {n}",
                            f"nbd+unix:///q?socket={nbd_sock}"], check=True, capture_output=True)
        after = bitmaps_of(await qmp.execute("query-named-block-nodes", {"flat": True}))
        await qmp.execute("block-export-del", {"id": "e"})
    finally:
        await qmp.disconnect()
    return out, after


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[list[Any], Any]]:
    d = tmp_path_factory.mktemp("bitmaps")
    results = []
    for program, sub in ((QSD, "qsd"), (None, "bg")):
        w = d / sub
        w.mkdir()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "a.qcow2"), "4M"], check=True)
        Path(w / "r.raw").write_bytes(bytes(1 << 20))
        args = ["--blockdev", f"driver=file,filename={w / 'a.qcow2'},node-name=fq",
                "--blockdev", "driver=qcow2,file=fq,node-name=q",
                "--blockdev", f"driver=file,filename={w / 'r.raw'},node-name=r"]
        with ServeProcess(w, args, program=program) as proc:
            results.append(asyncio.run(session(proc.socket, str(w / "nbd.sock"))))
            assert proc.stop() == 0
    return results


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c}-{i}" for i, (c, _) in enumerate(CASES)])
def test_same_reply(both: list[tuple[list[Any], Any]], i: int) -> None:
    assert both[1][0][i] == both[0][0][i]


def test_writes_through_an_export_mark_the_same_granules(both: list[tuple[list[Any], Any]]) -> None:
    theirs, ours = both[0][1], both[1][1]
    assert ours["q"] == theirs["q"]
    w = next(b for b in ours["q"] if b["name"] == "w")
    granules = {g for off, n in WRITES for g in range(off // 4096, (off + n - 1) // 4096 + 1)}
    assert w["count"] == len(granules) * 4096


# ---------------------------------------------------------------- persistent bitmaps of a qcow2 image

PERSISTENT: list[tuple[str, dict[str, Any]]] = [
    ("query-named-block-nodes", {"flat": True}),
    ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q", "bitmaps": ["zz"]}),
    ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "q", "bitmaps": ["b0"]}),
    ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "q", "bitmaps": ["b2"], "name": "x2"}),
    ("query-named-block-nodes", {"flat": True}),
    ("block-dirty-bitmap-clear", {"node": "q", "name": "b0"}),
    ("block-dirty-bitmap-remove", {"node": "q", "name": "b0"}),
    ("block-dirty-bitmap-merge", {"node": "q", "target": "b1", "bitmaps": ["b0"]}),
    ("block-export-del", {"id": "e1"}),
    ("block-export-del", {"id": "e2"}),
    ("block-dirty-bitmap-remove", {"node": "q", "name": "b2"}),
    ("block-dirty-bitmap-add", {"node": "q", "name": "new", "persistent": True, "granularity": 4096}),
    ("query-named-block-nodes", {"flat": True}),
]


async def persistent_session(sock: str, nbd_sock: str) -> list[Any]:
    qmp = qmp_mod.QMPClient("bitmaps")
    await qmp.connect(sock)
    out: list[Any] = []
    try:
        await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd_sock}}})
        for cmd, args in PERSISTENT:
            try:
                res = await qmp.execute(cmd, args)
                out.append(["ok", bitmaps_of(res) if cmd.startswith("query") else res])
            except qmp_mod.ExecuteError as e:
                out.append(["error", e.error_class, str(e)])
            if cmd == "block-export-del":
                await asyncio.sleep(0.2)  # the export goes once its clients are gone
    finally:
        await qmp.disconnect()
    return out


@pytest.mark.parametrize("ro", ["off", "on"])
def test_persistent_bitmaps_like_qsd(tmp_path: Path, ro: str) -> None:
    """A qcow2 with bitmaps from qemu-img/qemu-io, driven through the same commands: the same replies, and
    the image left behind has the same bitmaps for qemu-img info, passes qemu-img check."""
    infos, replies = [], []
    for program, sub in ((QSD, "qsd"), (None, "bg")):
        w = tmp_path / sub
        w.mkdir()
        img = w / "t.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "10M"], check=True)
        for extra in ([], ["-g", "4096"], ["--disable"]):
            name = {0: "b0", 2: "b1"}.get(len(extra), "b2")
            subprocess.run(["qemu-img", "bitmap", "--add", str(img), name, *extra], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 1 0 1", "-c", "write -P 2 1M 100k", str(img)], check=True,
                       capture_output=True)
        args = ["--blockdev", f"driver=file,filename={img},node-name=fq,read-only={ro}",
                "--blockdev", f"driver=qcow2,file=fq,node-name=q,read-only={ro}"]
        with ServeProcess(w, args, program=program) as proc:
            replies.append(asyncio.run(persistent_session(proc.socket, str(w / "nbd.sock"))))
            assert proc.stop() == 0
        info = subprocess.run(["qemu-img", "info", "--output=json", str(img)], capture_output=True, text=True,
                              check=True).stdout
        infos.append(json.loads(info)["format-specific"]["data"].get("bitmaps"))
        assert subprocess.run(["qemu-img", "check", str(img)], capture_output=True).returncode == 0
    assert replies[1] == replies[0]
    assert infos[1] == infos[0]
    if ro == "off":
        assert [b["name"] for b in infos[0]] == ["b1", "new"]
