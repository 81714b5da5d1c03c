"""Internal snapshots: made by either tool, listed and applied by the other; vm state; convert -l; commit/rebase."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from blockgraph_qcow2.testing import HAVE_QEMU, qemu_img, qemu_io

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io not installed")
K = 1024


def bg(*args: str) -> tuple[int, str, str]:
    from blockgraph.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def clean(path: Path) -> None:
    r = qemu_img("check", str(path), check=False)
    assert r.returncode == 0 and "No errors were found on the image." in r.stdout, r.stdout + r.stderr


def reads(path: Path, *checks: tuple[int, int, int]) -> None:
    qemu_io(path, *(f"read -P {p} {o} {n}" for p, o, n in checks))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "4M")
    qemu_io(p, "write -P 1 0 128k", "write -c -P 2 1M 64k")
    return p


def test_blockgraph_snapshots_qemu_applies(image: Path) -> None:
    assert bg("img", "snapshot", "-c", "one", str(image)) == (0, "", "")
    clean(image)
    qemu_io(image, "write -P 3 0 64k", "write -P 4 3M 64k")
    assert bg("img", "snapshot", "-c", "two", str(image))[0] == 0
    clean(image)
    listing = qemu_img("snapshot", "-l", str(image)).stdout
    assert bg("img", "snapshot", "-l", str(image))[1] == listing
    assert [line.split()[:2] for line in listing.splitlines()[2:]] == [["1", "one"], ["2", "two"]]
    qemu_img("snapshot", "-a", "one", str(image))
    clean(image)
    reads(image, (1, 0, 128 * K), (2, 1 << 20, 64 * K), (0, 3 << 20, 64 * K))
    qemu_img("snapshot", "-a", "two", str(image))
    reads(image, (3, 0, 64 * K), (4, 3 << 20, 64 * K))


def test_qemu_snapshots_blockgraph_applies_and_deletes(image: Path) -> None:
    qemu_img("snapshot", "-c", "one", str(image))
    qemu_io(image, "write -P 5 0 256k")
    assert bg("img", "snapshot", "-l", str(image))[1] == qemu_img("snapshot", "-l", str(image)).stdout
    assert bg("img", "snapshot", "-a", "one", str(image)) == (0, "", "")
    clean(image)
    reads(image, (1, 0, 128 * K), (0, 128 * K, 128 * K), (2, 1 << 20, 64 * K))
    qemu_io(image, "write -P 6 64k 64k")  # a write after apply copies the shared cluster
    assert bg("img", "snapshot", "-d", "one", str(image)) == (0, "", "")
    clean(image)
    assert qemu_img("snapshot", "-l", str(image)).stdout == ""
    reads(image, (1, 0, 64 * K), (6, 64 * K, 64 * K))


def test_apply_restores_the_size_and_delete_frees(image: Path) -> None:
    assert bg("img", "snapshot", "-c", "small", str(image))[0] == 0
    qemu_img("resize", str(image), "8M")
    qemu_io(image, "write -P 7 6M 64k")
    assert bg("img", "snapshot", "-a", "small", str(image))[0] == 0
    assert "virtual size: 4 MiB" in qemu_img("info", str(image)).stdout
    clean(image)
    assert bg("img", "snapshot", "-d", "1", str(image))[0] == 0
    clean(image)


def test_convert_and_measure_a_snapshot(image: Path, tmp_path: Path) -> None:
    qemu_img("snapshot", "-c", "s", str(image))
    qemu_io(image, "write -P 9 0 1M")
    mine, theirs = tmp_path / "mine.raw", tmp_path / "theirs.raw"
    assert bg("img", "convert", "-l", "snapshot.name=s", "-O", "raw", str(image), str(mine))[0] == 0
    qemu_img("convert", "-l", "snapshot.name=s", "-O", "raw", str(image), str(theirs))
    assert mine.read_bytes() == theirs.read_bytes()
    for args in (["-l", "s"], ["-l", "snapshot.id=1"], ["-l", "nope"]):
        real = qemu_img("measure", "-O", "qcow2", *args, str(image), check=False)
        assert bg("img", "measure", "-O", "qcow2", *args, str(image)) == (real.returncode, real.stdout, real.stderr)


def test_vmstate_round_trip_through_a_snapshot(tmp_path: Path) -> None:
    import asyncio

    from blockgraph.driver import SnapshotInfo
    from blockgraph.session import Session

    p = tmp_path / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "64M")
    state = bytes(range(256)) * 1000

    async def save() -> None:
        s = Session()
        try:
            node = await s.open_image(str(p), fmt="qcow2")
            await node.driver.save_vmstate(0, memoryview(state))
            await node.driver.snapshot_create(SnapshotInfo(name="vm", vm_state_size=len(state)))
        finally:
            await s.close()

    async def load() -> bytes:
        s = Session()
        try:
            node = await s.open_image(str(p), fmt="qcow2")
            await node.driver.snapshot_goto("vm")
            buf = bytearray(len(state))
            await node.driver.load_vmstate(0, memoryview(buf))
            return bytes(buf)
        finally:
            await s.close()

    asyncio.run(save())
    clean(p)
    assert " 250 KiB " in qemu_img("snapshot", "-l", str(p)).stdout
    assert asyncio.run(load()) == state
    clean(p)


def chain(tmp_path: Path, prefix: str) -> tuple[Path, Path, Path]:
    b, m, t = (tmp_path / f"{prefix}-{n}.qcow2" for n in "bmt")
    qemu_img("create", "-q", "-f", "qcow2", str(b), "4M")
    qemu_io(b, "write -P 1 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", b.name, "-F", "qcow2", str(m))
    qemu_io(m, "write -P 2 512k 1M", "write -z 3M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", m.name, "-F", "qcow2", str(t))
    qemu_io(t, "write -P 3 1M 100k")
    return b, m, t


@pytest.mark.parametrize("args", [[], ["-d"], ["-b", "x-b.qcow2"]])
def test_commit_matches_qemu_img(tmp_path: Path, args: list[str]) -> None:
    xb, xm, xt = chain(tmp_path, "x")
    yb, ym, yt = chain(tmp_path, "y")
    qemu_img("commit", *args, str(xt))
    mine = ["-b", "y-b.qcow2"] if args[:1] == ["-b"] else args
    assert bg("img", "commit", *mine, str(yt)) == (0, "Image committed.\n", "")
    for x, y in ((xb, yb), (xm, ym), (xt, yt)):
        assert qemu_img("compare", str(x), str(y), check=False).returncode == 0
        clean(y)


@pytest.mark.parametrize("target", ["b", "", "other"])
def test_rebase_matches_qemu_img(tmp_path: Path, target: str) -> None:
    _, _, xt = chain(tmp_path, "x")
    _, _, yt = chain(tmp_path, "y")
    other = tmp_path / "other.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(other), "4M")
    qemu_io(other, "write -P 8 0 2M")
    for t, p in ((xt, "x"), (yt, "y")):
        name = {"b": f"{p}-b.qcow2", "": "", "other": "other.qcow2"}[target]
        args = ["-b", name] + (["-F", "qcow2"] if name else [])
        if p == "x":
            qemu_img("rebase", *args, str(t))
        else:
            assert bg("img", "rebase", *args, str(t)) == (0, "", "")
    assert qemu_img("compare", str(xt), str(yt), check=False).returncode == 0
    clean(yt)
    assert qemu_img("info", str(xt)).stdout.replace("x-", "y-").splitlines()[4:] == \
        qemu_img("info", str(yt)).stdout.splitlines()[4:]


def test_unsafe_rebase_only_rewrites_the_header(tmp_path: Path) -> None:
    b, _, t = chain(tmp_path, "y")
    assert bg("img", "rebase", "-u", "-b", b.name, "-F", "qcow2", str(t)) == (0, "", "")
    assert "backing file: y-b.qcow2" in qemu_img("info", str(t)).stdout
    clean(t)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_convert_compressed(tmp_path: Path, ctype: str) -> None:
    import random

    raw = tmp_path / "src.raw"
    rng = random.Random(1)
    raw.write_bytes(rng.randbytes(100000) + b"text " * 40000 + bytes(1 << 20) + rng.randbytes(5000))
    out = tmp_path / "c.qcow2"
    assert bg("img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", "-f", "raw", str(raw),
              str(out)) == (0, "", "")
    clean(out)
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(raw), str(out), check=False).returncode == 0
    assert "compressed" in qemu_img("check", str(out)).stdout
    assert out.stat().st_size < raw.stat().st_size
    assert bg("img", "convert", "-c", "-O", "raw", "-f", "raw", str(raw), str(tmp_path / "x.raw")) == (
        1, "", "qemu-img: Compression not supported for this file format\n")


QEMU_SYSTEM = __import__("shutil").which("qemu-system-x86_64")


def _monitor(path: Path, *commands: str) -> str:
    import subprocess

    script = "".join(f"{c}\n" for c in (*commands, "quit"))
    r = subprocess.run([QEMU_SYSTEM, "-machine", "none", "-nodefaults", "-nographic", "-drive",
                        f"file={path},if=none,id=d0", "-monitor", "stdio"], input=script, capture_output=True,
                       text=True, timeout=60)
    return r.stdout + r.stderr


@pytest.mark.skipif(QEMU_SYSTEM is None, reason="qemu-system-x86_64 not installed")
def test_savevm_state_moves_between_the_tools(tmp_path: Path) -> None:
    """QEMU's savevm state is read back by blockgraph, stored in a snapshot blockgraph makes, and QEMU's loadvm
    accepts that snapshot."""
    import asyncio

    from blockgraph.driver import SnapshotInfo
    from blockgraph.session import Session

    p = tmp_path / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "64M")
    assert "Error" not in _monitor(p, "savevm s1")
    assert " s1 " in bg("img", "snapshot", "-l", str(p))[1]

    async def copy_state() -> bytes:
        s = Session()
        try:
            node = await s.open_image(str(p), fmt="qcow2")
            drv = node.driver
            size = next(sn.vm_state_size for sn in await drv.snapshot_list() if sn.name == "s1")
            await drv.snapshot_goto("s1")
            state = bytearray(size)
            await drv.load_vmstate(0, memoryview(state))
            await drv.save_vmstate(0, memoryview(state))
            await drv.snapshot_create(SnapshotInfo(name="copy", vm_state_size=size))
            return bytes(state)
        finally:
            await s.close()

    assert asyncio.run(copy_state()).startswith(b"QEVM")
    clean(p)
    out = _monitor(p, "loadvm copy", "info status")
    assert "Error" not in out and "VM status: running" in out
    assert "Error: Snapshot 'nope' does not exist" in _monitor(p, "loadvm nope")


def _allocated_clusters(path: Path) -> int:
    import json

    return json.loads(qemu_img("check", "--output=json", str(path)).stdout)["allocated-clusters"]


@pytest.mark.skipif(QEMU_SYSTEM is None, reason="qemu-system-x86_64 not installed")
def test_savevm_leaves_no_live_vm_state_like_qemu(tmp_path: Path) -> None:
    """After savevm QEMU zeroes the live copy of the vm state (copying the shared L2 table): the active image
    maps no more clusters than before."""
    p = tmp_path / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "64M")
    qemu_io(p, "write -P 1 0 1M")
    before = _allocated_clusters(p)
    assert "Error" not in _monitor(p, "savevm s1")
    assert _allocated_clusters(p) == before


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "extended_l2=on"])
def test_snapshot_drops_the_live_vm_state(opts: str, tmp_path: Path) -> None:
    import asyncio

    from blockgraph.driver import SnapshotInfo
    from blockgraph.session import Session

    p = tmp_path / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(p), "64M")
    qemu_io(p, "write -P 1 0 1M")
    before = _allocated_clusters(p)
    state = bytes(range(256)) * 4000  # 1000 KiB: 16 clusters

    async def run(*steps: str) -> bytes:
        s = Session()
        try:
            drv = (await s.open_image(str(p), fmt="qcow2")).driver
            buf = bytearray(len(state))
            for step in steps:
                if step == "save":
                    await drv.save_vmstate(0, memoryview(state))
                    await drv.snapshot_create(SnapshotInfo(name="vm", vm_state_size=len(state)))
                elif step == "goto":
                    await drv.snapshot_goto("vm")
                elif step == "load":
                    await drv.load_vmstate(0, memoryview(buf))
            return bytes(buf)
        finally:
            await s.close()

    assert asyncio.run(run("save", "load")) == bytes(len(state))  # the live copy reads zeros now
    clean(p)
    assert _allocated_clusters(p) == before
    assert asyncio.run(run("goto", "load")) == state
    clean(p)
    assert bg("img", "snapshot", "-d", "vm", str(p))[0] == 0
    clean(p)


@pytest.mark.parametrize("op", ["-d", "-a"])
def test_freed_clusters_are_discarded_like_qemu(op: str, tmp_path: Path) -> None:
    """Deleting or applying a snapshot punches the clusters it frees out of the file (pass-discard-snapshot,
    on by default): the file keeps exactly as many blocks as after qemu-img, with and without the option."""
    import os
    import shutil

    p = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "8M")
    qemu_io(p, "write -P 1 0 4M")
    qemu_img("snapshot", "-c", "s", str(p))
    qemu_io(p, "write -P 2 0 4M")
    blocks = {}
    for tool in ("qemu", "bg"):
        for passdown in ("on", "off"):
            q = tmp_path / f"{tool}-{passdown}.qcow2"
            shutil.copyfile(p, q)
            opts = f"driver=qcow2,file.filename={q},pass-discard-snapshot={passdown}"
            if tool == "qemu":
                qemu_img("snapshot", "--image-opts", op, "s", opts)
            else:
                assert bg("img", "snapshot", "--image-opts", op, "s", opts)[0] == 0
            clean(q)
            blocks[tool, passdown] = os.stat(q).st_blocks
    assert blocks["bg", "on"] == blocks["qemu", "on"]
    assert blocks["bg", "off"] == blocks["qemu", "off"]
    assert blocks["bg", "on"] < blocks["bg", "off"] - 4096 * 2 + 512  # the 4 MiB freed are gone from the file
