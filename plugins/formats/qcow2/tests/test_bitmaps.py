"""Persistent dirty bitmaps in qcow2 images made by qemu-img / qemu-io: loaded at open with QEMU's flags,
marked in use while open read-write, written back at close so that qemu-img check / info and qemu-nbd see
what QEMU itself would have left; broken directories refused with QEMU's texts."""

from __future__ import annotations

import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import blockgraph.sync as bgsync
import pytest

TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                reason="qemu-utils (qemu-img, qemu-io, qemu-nbd) or libnbd-bin (nbdinfo) missing")
BG = [sys.executable, "-m", "blockgraph.cli.main"]
MiB = 1 << 20
WRITES = ["write -P 1 0 1", "write -P 2 1M 100k", "write -z 5M 64k"]


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def make(path: Path, *, writes: list[str] = WRITES) -> Path:
    assert run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "10M").returncode == 0
    for args in (["b0"], ["b1", "-g", "4096"], ["b2", "--disable"]):
        assert run("qemu-img", "bitmap", "--add", str(path), *args).returncode == 0
    if writes:
        cmd = ["qemu-io"]
        for w in writes:
            cmd += ["-c", w]
        assert run(*cmd, str(path)).returncode == 0
    return path


def loaded(path: Path, read_only: bool = True) -> dict[str, tuple[dict, list[tuple[int, int]]]]:
    with bgsync.open(str(path), read_only=read_only) as img:
        return {bm.name: (bm.info(), [(s, n) for s, n, d in bm.extents(0, bm.size) if d])
                for bm in img.blk.node.dirty_bitmaps}


def dirty_map(path: Path, name: str, sock: Path) -> str:
    srv = subprocess.Popen(["qemu-nbd", "-r", "-t", "-B", name, "-k", str(sock), str(path)],
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert srv.poll() is None, srv.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        res = run("nbdinfo", f"--map=qemu:dirty-bitmap:{name}", f"nbd+unix:///?socket={sock}")
        assert res.returncode == 0, res.stderr
        return res.stdout
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(30)


def info_bitmaps(path: Path) -> str:
    out = run("qemu-img", "info", "-U", str(path)).stdout
    return out[out.index("Format specific information:"):]


def test_loaded_as_qemu_saved_them(tmp_path: Path) -> None:
    got = loaded(make(tmp_path / "a.qcow2"))
    assert list(got) == ["b2", "b1", "b0"]  # newest first: QEMU creates them in directory order at the head
    b0, b1, b2 = got["b0"], got["b1"], got["b2"]
    assert b0[1] == [(0, 65536), (MiB, 131072), (5 * MiB, 65536)]
    assert b1[1] == [(0, 4096), (MiB, 102400), (5 * MiB, 65536)]
    assert b2[1] == [] and b2[0]["recording"] is False
    assert b0[0] == {"name": "b0", "recording": True, "persistent": True, "busy": False, "granularity": 65536,
                     "count": 262144}


def test_read_write_session_leaves_what_qemu_leaves(tmp_path: Path) -> None:
    ours, theirs = make(tmp_path / "ours.qcow2"), make(tmp_path / "theirs.qcow2")
    more = ["write -P 9 2M 4k", "write -P 9 9M 70k", "discard 1M 64k"]
    cmd = ["io"]
    for w in more:
        cmd += ["-c", w]
    assert subprocess.run([*BG, *cmd, str(ours)], capture_output=True, timeout=60).returncode == 0
    cmd = ["qemu-io"]
    for w in more:
        cmd += ["-c", w]
    assert run(*cmd, str(theirs)).returncode == 0
    check = run("qemu-img", "check", str(ours))
    assert check.returncode == 0 and "No errors were found on the image." in check.stdout
    assert info_bitmaps(ours) == info_bitmaps(theirs)
    assert "in-use" not in info_bitmaps(ours)
    for name in ("b0", "b1", "b2"):
        assert dirty_map(ours, name, tmp_path / f"o{name}.sock") == dirty_map(theirs, name, tmp_path / f"t{name}")
    assert run("qemu-img", "compare", str(ours), str(theirs)).returncode == 0


def test_fresh_bitmap_gets_a_data_cluster(tmp_path: Path) -> None:
    ours = make(tmp_path / "fresh.qcow2", writes=[])
    with bgsync.open(str(ours)) as img:
        img.write(3 * MiB, b"x" * 10)
    assert run("qemu-img", "check", str(ours)).returncode == 0
    got = loaded(ours)
    assert got["b0"][1] == [(3 * MiB, 65536)] and got["b1"][1] == [(3 * MiB, 4096)] and got["b2"][1] == []


def test_in_use_while_open_and_inconsistent_after_a_crash(tmp_path: Path) -> None:
    path = make(tmp_path / "crash.qcow2")
    code = ("import blockgraph.sync as s, sys, time\n"
            f"img = s.open({str(path)!r})\nprint('open', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "open\n"
        assert info_bitmaps(path).count("in-use") == 3  # as QEMU marks them on a read-write open
    finally:
        proc.kill()
        proc.wait(30)
    got = loaded(path)
    assert all(info.get("inconsistent") is True and info["recording"] is False for info, _ in got.values())
    assert run("qemu-img", "check", str(path)).returncode == 0
    res = subprocess.run([*BG, "nbd", "-r", "-B", "b0", "-k", str(tmp_path / "x.sock"), str(path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.splitlines()[-1] == "qemu-nbd: Bitmap 'b0' is inconsistent and cannot be used"


def test_ignored_when_the_autoclear_bit_is_clear(tmp_path: Path) -> None:
    path = make(tmp_path / "old.qcow2")
    with open(path, "r+b") as f:
        f.seek(88)
        auto = struct.unpack(">Q", f.read(8))[0]
        f.seek(88)
        f.write(struct.pack(">Q", auto & ~1))
    assert loaded(path) == {}


def _directory(path: Path) -> int:
    d = path.read_bytes()[:65536]
    pos = struct.unpack_from(">I", d, 100)[0]
    while True:
        typ, length = struct.unpack_from(">II", d, pos)
        if typ == 0x23852875:
            return pos
        assert typ != 0
        pos += 8 + (length + 7) // 8 * 8


@pytest.mark.parametrize("where,value", [("gbits", 40), ("nb", 2), ("nb", 4), ("flags", 0x10), ("type", 2)])
def test_broken_directory_refused_as_qemu(tmp_path: Path, where: str, value: int) -> None:
    path = make(tmp_path / "bad.qcow2", writes=[])
    ext = _directory(path)
    data = bytearray(path.read_bytes())
    _, _, _, off = struct.unpack_from(">IIQQ", data, ext + 8)
    if where == "nb":
        struct.pack_into(">I", data, ext + 8, value)
    elif where == "gbits":
        data[off + 17] = value
    elif where == "flags":
        struct.pack_into(">I", data, off + 12, value)
    else:
        data[off + 16] = value
    path.write_bytes(data)
    theirs = run("qemu-img", "info", str(path))
    ours = subprocess.run([*BG, "img", "info", str(path)], capture_output=True, text=True, timeout=60)
    assert theirs.returncode == ours.returncode == 1
    assert ours.stderr.splitlines()[0] == theirs.stderr.splitlines()[0]


def test_new_persistent_bitmap_is_stored_with_its_dirty_granules(tmp_path: Path) -> None:
    from blockgraph import bitmaps

    path = make(tmp_path / "new.qcow2", writes=[])
    with bgsync.open(str(path)) as img:
        node = img.blk.node
        node.driver.can_store_new_dirty_bitmap("fresh", 4096)
        bitmaps.create(node, "fresh", 4096, persistent=True)
        img.write(7 * MiB + 100, b"y" * 5000)
    assert run("qemu-img", "check", str(path)).returncode == 0
    assert "name: fresh" in info_bitmaps(path)
    assert dirty_map(path, "fresh", tmp_path / "f.sock").split("\n")[1].split() == [str(7 * MiB), "8192", "1",
                                                                                      "dirty"]


def test_v2_image_cannot_store_bitmaps(tmp_path: Path) -> None:
    from blockgraph.bitmaps import BitmapError

    path = tmp_path / "v2.qcow2"
    assert run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(path), "1M").returncode == 0
    with bgsync.open(str(path)) as img, pytest.raises(BitmapError) as err:
        img.blk.node.driver.can_store_new_dirty_bitmap("b", 65536)
    assert str(err.value) == f"Can't make bitmap 'b' persistent in '{img.blk.node.name}': Cannot store dirty " \
                             "bitmaps in qcow2 v2 files"


@pytest.mark.parametrize("crash", [False, True], ids=["clean", "in-use"])
def test_img_info_lists_bitmaps_as_qemu_img(tmp_path: Path, crash: bool) -> None:
    path = make(tmp_path / "info.qcow2")
    if crash:
        sock = tmp_path / "k.sock"
        srv = subprocess.Popen(["qemu-nbd", "-k", str(sock), str(path)])
        deadline = time.monotonic() + 30
        while not sock.exists() or "in-use" not in info_bitmaps(path):
            assert time.monotonic() < deadline, "qemu-nbd did not mark the bitmaps in use"
            time.sleep(0.05)
        srv.kill()
        srv.wait(30)
    for fmt in ("human", "json"):
        theirs = run("qemu-img", "info", f"--output={fmt}", str(path)).stdout
        ours = subprocess.run([*BG, "img", "info", f"--output={fmt}", str(path)], capture_output=True, text=True,
                              timeout=60).stdout
        assert ours == theirs
    assert ("in-use" in theirs) is crash


@pytest.mark.parametrize("size", ["20M", "1G", "1M"])
def test_resize_keeps_bitmaps_as_qemu_img_resize(tmp_path: Path, size: str) -> None:
    """512-byte clusters: one table entry covers 256 MiB of 64 KiB granules, so 1G needs a bigger table."""
    base = tmp_path / "base.qcow2"
    assert run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(base), "10M").returncode == 0
    assert run("qemu-img", "bitmap", "--add", str(base), "b0").returncode == 0
    assert run("qemu-io", "-c", "write 0 1", "-c", "write 9M 1", str(base)).returncode == 0
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copyfile(base, ours)
    shutil.copyfile(base, theirs)
    assert run("qemu-img", "resize", "-q", "--shrink", str(theirs), size).returncode == 0
    assert subprocess.run([*BG, "img", "resize", "-q", "--shrink", str(ours), size], timeout=60).returncode == 0
    assert run("qemu-img", "check", str(ours)).returncode == 0
    assert info_bitmaps(ours).split("bitmaps:")[1] == info_bitmaps(theirs).split("bitmaps:")[1]
    assert dirty_map(ours, "b0", tmp_path / "o.sock") == dirty_map(theirs, "b0", tmp_path / "t.sock")


def _guest(path: Path, out: Path) -> bytes:
    assert run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(path), str(out)).returncode == 0
    return out.read_bytes()


def test_mutated_bitmap_metadata_errors_cleanly_and_never_touches_data(tmp_path: Path) -> None:
    """Random bytes of the extension, directory and tables changed: opening read-only fails with an error
    naming the problem or succeeds without writing; read-write never changes what the guest reads."""
    import random

    from blockgraph.errors import BlockGraphError

    base = make(tmp_path / "base.qcow2")
    data = base.read_bytes()
    ext = _directory(base)
    _, _, dsize, doff = struct.unpack_from(">IIQQ", data, ext + 8)
    tables = []
    pos = doff
    while pos < doff + dsize:
        toff, tsize, _, _, _, nsize, extra = struct.unpack_from(">QIIBBHI", data, pos)
        tables.append((toff, tsize * 8))
        pos += -(-(24 + nsize + extra) // 8) * 8
    regions = [(ext + 8, 24), (doff, dsize), *tables]
    want = _guest(base, tmp_path / "want.raw")
    rnd = random.Random(3)
    for i in range(40):
        buf = bytearray(data)
        if i % 2:  # a table entry aimed at another cluster of the file (guest data, L1, refcounts...)
            toff, _ = rnd.choice(tables)
            struct.pack_into(">Q", buf, toff, rnd.randrange(len(data) // 65536) * 65536)
        else:
            for _ in range(rnd.randint(1, 3)):
                off, n = rnd.choice(regions)
                buf[off + rnd.randrange(n)] = rnd.randrange(256)
        path = tmp_path / f"m{i}.qcow2"
        path.write_bytes(buf)
        try:
            with bgsync.open(str(path), read_only=True):
                pass
        except BlockGraphError as e:
            assert str(e)
        assert path.read_bytes() == buf
        try:
            with bgsync.open(str(path)) as img:
                img.write(8 * MiB, b"z" * 512)
        except BlockGraphError as e:
            assert str(e)
            continue
        got = _guest(path, tmp_path / "got.raw")
        assert got[:8 * MiB] == want[:8 * MiB] and got[8 * MiB:8 * MiB + 512] == b"z" * 512


def test_removing_an_inconsistent_bitmap_frees_only_what_nothing_else_uses(tmp_path: Path) -> None:
    """An in_use bitmap's table is never validated: one that names a guest data cluster must not free it
    when the bitmap is removed; its own table cluster, referenced by nothing else, is freed as by QEMU."""
    import json

    path = make(tmp_path / "a.qcow2")
    before = _guest(path, tmp_path / "before.raw")
    extent = next(e for e in json.loads(run("qemu-img", "map", "--output=json", str(path)).stdout)
                  if e["start"] <= MiB < e["start"] + e["length"] and e["data"])
    host = extent["offset"] + MiB - extent["start"]
    pos = _directory(path)
    data = path.read_bytes()
    _, _, _, doff = struct.unpack_from(">IIQQ", data, pos + 8)
    name_size, extra = struct.unpack_from(">HI", data, doff + 18)
    entry = doff + (24 + extra + name_size + 7) // 8 * 8  # b1's entry follows b0's (padded to 8 bytes)
    table = struct.unpack_from(">Q", data, entry)[0]
    with path.open("r+b") as f:
        flags = struct.unpack_from(">I", data, entry + 12)[0]
        f.seek(entry + 12)
        f.write(struct.pack(">I", flags | 1))  # in_use: b1 was not saved cleanly
        f.seek(table)
        f.write(struct.pack(">Q", host))  # and its table now names the guest's data cluster at 1 MiB
    r = subprocess.run([*BG, "img", "bitmap", "--remove", str(path), "b1"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    res = run("qemu-img", "check", str(path))
    assert res.returncode in (0, 3) and "ERROR" not in res.stdout + res.stderr, res.stdout + res.stderr
    assert _guest(path, tmp_path / "after.raw") == before
    assert [b["name"] for b in json.loads(run("qemu-img", "info", "--output=json", str(path)).stdout)
            ["format-specific"]["data"]["bitmaps"]] == ["b0", "b2"]
