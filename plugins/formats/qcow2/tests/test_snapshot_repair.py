"""Snapshot tables QEMU refuses at open, and ``img check -r all`` repairing them as ``qemu-img check -r all`` does.

Each image is made with qemu-img (three snapshots over different data), then its snapshot table is patched
with struct: an entry with 2 KiB of extra data, entries with too little, a table past 64 MiB (sparse names),
more than 65536 entries, a snapshot L1 table off its cluster boundary. Both tools run on identical copies at
the same path, so their output must match byte for byte; the repaired images must then pass ``qemu-img
check``, list the same snapshots and hold the same data in each kept snapshot.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from blockgraph_qcow2.testing import HAVE_QEMU, QEMU_IMG, qemu_img, qemu_io

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io not installed")
CS = 65536
ENTRY = struct.Struct(">QIHHIIQII")  # l1 offset, l1 size, id size, name size, date, nsec, clock, vm32, extra size
Entry = tuple[list[int], bytes, bytes]  # header fields, extra data, id + name


def bg(*args: str) -> tuple[int, str, str]:
    from blockgraph.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["img", *args])
    return rc, out.getvalue(), err.getvalue()


def real(*args: str) -> tuple[int, str, str]:
    r = qemu_img(*args, check=False)
    return r.returncode, r.stdout, r.stderr


# ---------------------------------------------------------------- crafting


def header_table(path: Path) -> tuple[int, int]:
    with open(path, "rb") as f:
        f.seek(60)
        return struct.unpack(">IQ", f.read(12))


def read_entries(path: Path) -> list[Entry]:
    nb, off = header_table(path)
    with open(path, "rb") as f:
        f.seek(off)
        t = f.read(1 << 20)
    out, pos = [], 0
    for _ in range(nb):
        pos += -pos % 8
        v = list(ENTRY.unpack_from(t, pos))
        extra = t[pos + 40:pos + 40 + v[8]]
        names = t[pos + 40 + v[8]:pos + 40 + v[8] + v[2] + v[3]]
        out.append((v, extra, names))
        pos += 40 + v[8] + v[2] + v[3]
    return out


def pack(entries: list[Entry]) -> bytes:
    out = bytearray()
    for v, extra, names in entries:
        out += bytes(-len(out) % 8)
        out += ENTRY.pack(*v[:8], len(extra)) + extra + names
    return bytes(out)


def rewrite_in_place(path: Path, entries: list[Entry]) -> None:
    """The table stays in its cluster (it fits): no refcount changes."""
    data = pack(entries)
    assert len(data) <= CS
    _, off = header_table(path)
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def set_refcount(path: Path, cluster: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(48)
        f.seek(struct.unpack(">Q", f.read(8))[0])
        block = struct.unpack(">Q", f.read(8))[0]
        f.seek(block + 2 * cluster)
        f.write(struct.pack(">H", value))


def relocate(path: Path, entries: list[Entry], nb: int | None = None) -> None:
    """Write the table at the end of the file (zero parts left sparse), refcount its clusters, free the old."""
    _, old = header_table(path)
    start = pos = -(-path.stat().st_size // CS) * CS
    with open(path, "r+b") as f:
        for v, extra, names in entries:
            pos += -pos % 8
            f.seek(pos)
            f.write(ENTRY.pack(*v[:8], len(extra)) + extra)
            pos += 40 + len(extra)
            for part_start, part_len in ((0, v[2]), (v[2], v[3])):
                text = names[part_start:part_start + part_len].rstrip(b"\0")
                if text:
                    f.seek(pos + part_start)
                    f.write(text)
            pos += v[2] + v[3]
        f.truncate(-(-pos // CS) * CS)
        f.seek(60)
        f.write(struct.pack(">IQ", len(entries) if nb is None else nb, start))
    for c in range(start // CS, -(-pos // CS)):
        set_refcount(path, c, 1)
    set_refcount(path, old // CS, 0)


def bare_entry(ident: str, extra: bytes = struct.pack(">QQQ", 0, 4 << 20, 0), name_size: int = 0,
               id_size: int = 0) -> Entry:
    """A snapshot with no L1 table (l1_size 0: nothing to count), padded names if sizes are given."""
    raw_id = ident.encode().ljust(id_size, b"\0")
    raw_name = (b"n" + ident.encode()).ljust(name_size, b"\0") if name_size else b""
    return [0, 0, len(raw_id), len(raw_name), 0, 0, 0, 0, 0], extra, raw_id + raw_name


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("snaprepair") / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "4M")
    qemu_io(p, "write -P 1 0 64k", "write -P 7 1M 64k")
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_io(p, "write -P 2 0 64k")
    qemu_img("snapshot", "-c", "s2", str(p))
    qemu_io(p, "write -P 3 2M 64k")
    qemu_img("snapshot", "-c", "s3", str(p))
    return p


def copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- comparing


@contextlib.contextmanager
def in_dir(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def both(crafted: Path, *args: str) -> tuple[Path, Path]:
    """``img ARGS IMAGE`` with qemu-img and with blockgraph, each on a fresh copy at the same (relative)
    path: identical exit code, stdout and stderr. Returns the two images afterwards (qemu's, ours)."""
    work = crafted.parent
    name = "t.qcow2"
    results = []
    for tool, suffix in ((real, ".qemu"), (bg, ".bg")):
        copy(crafted, work / name)
        with in_dir(work):
            results.append(tool(*args, name))
        (work / name).rename(work / (name + suffix))
    assert results[1] == results[0]
    return work / (name + ".qemu"), work / (name + ".bg")


def snapshot_list(path: Path) -> str:
    return real("snapshot", "-l", str(path))[1]


def assert_same_repair(qemu_out: Path, bg_out: Path, kept: list[str]) -> None:
    """Both repaired images are clean for qemu-img, list the same snapshots and hold the same data in each."""
    for p in (qemu_out, bg_out):
        rc, out, err = real("check", str(p))
        assert (rc, err) == (0, ""), out + err
        assert "No errors were found on the image." in out
    listing = snapshot_list(qemu_out)
    assert snapshot_list(bg_out) == listing
    names = [line.split()[1] for line in listing.splitlines()[2:]]
    assert names[:len(kept)] == kept
    for name in kept:
        raws = []
        for p in (qemu_out, bg_out):
            raw = p.with_suffix(p.suffix + ".raw")
            qemu_img("convert", "-O", "raw", "-l", f"snapshot.name={name}", str(p), str(raw))
            raws.append(raw.read_bytes())
            raw.unlink()
        assert raws[0] == raws[1]


def assert_same_file_once_discarding(qemu_out: Path, bg_out: Path) -> None:
    """Where the driver discards freed snapshot clusters (pass-discard-snapshot) as QEMU does, the repaired
    file is QEMU's byte for byte; before that, only the freed clusters' stale bytes differ."""
    from blockgraph_qcow2.driver import Qcow2Driver

    if hasattr(Qcow2Driver, "_discarding_freed"):
        assert bg_out.read_bytes() == qemu_out.read_bytes()


def assert_refused_alike(crafted: Path, expected_err: str) -> None:
    """info, snapshot -l and check without -r: same failure as qemu-img's, and nothing written."""
    before = digest(crafted)
    for args in (("info",), ("snapshot", "-l"), ("check",), ("check", "--output=json"), ("check", "-r", "leaks")):
        _, b = both(crafted, *args)
        assert digest(b) == before
    rc, _out, err = real("info", str(crafted))
    assert rc == 1 and expected_err in err


# ---------------------------------------------------------------- cases


@pytest.fixture
def too_much_extra(base: Path, tmp_path: Path) -> Path:
    p = copy(base, tmp_path / "extra.qcow2")
    entries = read_entries(p)
    v, extra, names = entries[1]
    entries[1] = (v, extra + bytes(range(256)) * 8, names)  # 2072 bytes of extra data
    rewrite_in_place(p, entries)
    return p


def test_too_much_extra_data(too_much_extra: Path) -> None:
    assert_refused_alike(too_much_extra, "Too much extra metadata in snapshot table entry 1\n"
                                         "You can force-remove this extra metadata with qemu-img check -r all\n")
    q, b = both(too_much_extra, "check", "-r", "all")
    assert_same_repair(q, b, ["s1", "s2", "s3"])
    both(too_much_extra, "check", "-r", "all", "--output=json")
    # QEMU keeps the first 1024 bytes of extra data (what it does not know it carries along)
    assert read_entries(b) == read_entries(q)
    assert read_entries(b)[1][0][8] == 1024
    assert_same_file_once_discarding(q, b)


def test_incomplete_entries(base: Path, tmp_path: Path) -> None:
    p = copy(base, tmp_path / "inc.qcow2")
    entries = read_entries(p)
    entries[0] = (entries[0][0], entries[0][1][:8], entries[0][2])
    entries[2] = (entries[2][0], b"", entries[2][2])
    rewrite_in_place(p, entries)
    before = digest(p)
    for args in (("check",), ("check", "--output=json"), ("info",), ("snapshot", "-l")):
        q, b = both(p, *args)
        assert digest(b) == before
    q, b = both(p, "check", "-r", "all")
    assert_same_repair(q, b, ["s1", "s2", "s3"])
    assert [e[0][8] for e in read_entries(b)] == [e[0][8] for e in read_entries(q)] == [24, 24, 24]
    assert_same_file_once_discarding(q, b)


def test_v2_entries_need_no_extra_data(tmp_path: Path) -> None:
    """Only v3 requires 16 bytes of extra data per entry: a v2 image without any is clean for both."""
    p = tmp_path / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(p), "1M")
    qemu_io(p, "write -P 4 0 4k")
    qemu_img("snapshot", "-c", "old", str(p))
    entries = read_entries(p)
    entries[0] = (entries[0][0], b"", entries[0][2])
    rewrite_in_place(p, entries)
    both(p, "check")
    q, b = both(p, "check", "-r", "all")
    assert digest(b) == digest(q) == digest(p)
    assert bg("snapshot", "-l", str(p)) == real("snapshot", "-l", str(p))


@pytest.mark.parametrize("nb, offset", [(0, 0x12345), (2, 0x10200)])
def test_table_offset_invalid(base: Path, tmp_path: Path, nb: int, offset: int) -> None:
    p = copy(base, tmp_path / "off.qcow2")
    with open(p, "r+b") as f:
        f.seek(60)
        f.write(struct.pack(">IQ", nb, offset))
    assert_refused_alike(p, "Snapshot table offset invalid\n")
    both(p, "check", "-r", "all")


@pytest.mark.parametrize("field, delta", [(0, 512), (1, 0x400000)])
def test_bad_snapshot_l1_is_reported_not_fixed(base: Path, tmp_path: Path, field: int, delta: int) -> None:
    """QEMU does not repair a snapshot whose L1 table is off its cluster or too large: it stays a corruption."""
    p = copy(base, tmp_path / "l1.qcow2")
    entries = read_entries(p)
    entries[1][0][field] += delta
    rewrite_in_place(p, entries)
    both(p, "check")
    both(p, "check", "--output=json")
    q, b = both(p, "check", "-r", "all")
    assert real("check", str(b)) == real("check", str(q))
    assert real("check", str(b))[0] == 2
    assert snapshot_list(b) == snapshot_list(q)


@pytest.fixture
def table_too_big(base: Path, tmp_path: Path) -> Path:
    """The three real snapshots, then 516 with 64 KiB ids and names (sparse): the table passes 64 MiB."""
    p = copy(base, tmp_path / "big.qcow2")
    entries = read_entries(p) + [bare_entry(str(i), id_size=65535, name_size=65535) for i in range(4, 520)]
    relocate(p, entries)
    return p


def test_table_too_big(table_too_big: Path) -> None:
    assert_refused_alike(table_too_big, "Snapshot table is too big\n"
                                        "You can force-remove all 5 overhanging snapshots with qemu-img check -r all\n")
    q, b = both(table_too_big, "check", "-r", "all")
    assert_same_repair(q, b, ["s1", "s2", "s3"])
    assert header_table(b)[0] == header_table(q)[0] == 514


def many_entries(base: Path, tmp_path: Path, count: int) -> Path:
    p = copy(base, tmp_path / "many.qcow2")
    entries = read_entries(p) + [bare_entry(str(i)) for i in range(4, count + 1)]
    relocate(p, entries)
    return p


def test_too_many_snapshots_refused(base: Path, tmp_path: Path) -> None:
    p = copy(base, tmp_path / "many.qcow2")
    relocate(p, read_entries(p), nb=65537)  # the count alone is checked before the table is read
    assert_refused_alike(p, "Snapshot table too large\n")


@pytest.mark.slow
def test_too_many_snapshots_repaired(base: Path, tmp_path: Path) -> None:
    """65537 entries: -r all drops the last one. qemu-img needs seconds per open of such a table, so the
    repaired images are compared by their headers and tables, and only ours is checked by qemu-img."""
    p = many_entries(base, tmp_path, 65537)
    q, b = both(p, "check", "-r", "all")
    nb, off = header_table(b)
    assert (nb, off) == header_table(q) and nb == 65536
    size = len(pack([bare_entry(str(i)) for i in range(65533)])) + 200
    with open(q, "rb") as fq, open(b, "rb") as fb:
        fq.seek(off)
        fb.seek(off)
        assert fb.read(size) == fq.read(size)
    rc, out, _ = real("check", str(b))
    assert rc == 0 and out.startswith("No errors were found on the image.")


def test_opened_read_only_never_writes(too_much_extra: Path, table_too_big: Path) -> None:
    for p in (too_much_extra, table_too_big):
        before = digest(p)
        for args in (("info",), ("snapshot", "-l"), ("check",), ("check", "-r", "leaks"), ("measure", "-O", "qcow2")):
            rc, _out, err = bg(*args, str(p))
            assert rc != 0 and "Traceback" not in err
        assert digest(p) == before


def test_repaired_image_opens_in_blockgraph(too_much_extra: Path) -> None:
    rc, _out, _err = bg("check", "-r", "all", str(too_much_extra))
    assert rc == 0
    rc, out, err = bg("snapshot", "-l", str(too_much_extra))
    assert (rc, err) == (0, "")
    assert out == real("snapshot", "-l", str(too_much_extra))[1]
    assert QEMU_IMG


def run_failing_at(path: Path, k: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """``img check -r all`` with the k-th write to the image file failing (and every later one not made):
    the file holds exactly the writes before it, as after a crash. Returns how many writes were attempted."""
    import errno

    from blockgraph.errors import BlockIOError
    from blockgraph.node import Child

    orig = Child.pwritev
    count = 0

    def pwritev(self: Child, offset: int, buf: memoryview, *args: object) -> object:
        nonlocal count
        if self.node.driver_name == "file":
            count += 1
            if count >= k:
                raise BlockIOError(errno.EIO, op="write")
        return orig(self, offset, buf, *args)

    with monkeypatch.context() as m:
        m.setattr(Child, "pwritev", pwritev)
        bg("check", "-r", "all", str(path))
    return count


def test_table_rewrite_is_crash_safe(too_much_extra: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut the repair after each of its writes: the image is either still the old one (which qemu-img refuses
    the same way) or has the new table with nothing worse than leaks; qemu-img check -r all then always ends
    with the three snapshots and their data."""
    clean = copy(too_much_extra, tmp_path / "clean.qcow2")
    writes = run_failing_at(clean, 1 << 30, monkeypatch)
    assert writes >= 3  # the new table, the header switch, the old table's refcount
    listing = snapshot_list(clean)
    for k in range(1, writes + 1):
        p = copy(too_much_extra, tmp_path / "cut.qcow2")
        run_failing_at(p, k, monkeypatch)
        rc, out, err = real("check", str(p))
        if "Too much extra metadata in snapshot table entry 1" in err:
            assert rc == 1
        else:
            assert rc in (0, 3), (k, out, err)
            assert all(line.startswith("Leaked cluster ") for line in err.splitlines()), (k, err)
        assert real("check", "-r", "all", str(p))[0] == 0
        assert snapshot_list(p) == listing
        for name in ("s1", "s2"):
            raws = []
            for img in (clean, p):
                raw = img.with_suffix(".raw")
                qemu_img("convert", "-O", "raw", "-l", f"snapshot.name={name}", str(img), str(raw))
                raws.append(raw.read_bytes())
            assert raws[0] == raws[1]


def test_backing_opened_in_check_mode_too(too_much_extra: Path, tmp_path: Path) -> None:
    """qemu-img check passes BDRV_O_CHECK down to the backing file: an overlay over an image whose table QEMU
    refuses still checks clean, while a plain open of the overlay fails on its backing."""
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", too_much_extra.name, "-F", "qcow2", str(overlay), "4M")
    for args in (("check",), ("check", "--output=json")):
        mine, theirs = bg(*args, str(overlay)), real(*args, str(overlay))
        assert mine == theirs and mine[0] == 0
    rc, _out, err = bg("info", "--backing-chain", str(overlay))
    assert rc == 1 and "Too much extra metadata in snapshot table entry 1" in err
