"""vmdk both ways against the real qemu-img and qemu-io."""

from __future__ import annotations

import asyncio
import json
import random
import re
from pathlib import Path

import pytest
from blockgraph.session import Session
from vmdk_helpers import (
    BLOCKGRAPH,
    QEMU_IMG,
    QEMU_IO,
    SUBFORMATS,
    bg_create,
    bg_read_all,
    needs_qemu,
    open_blk,
    qemu_raw,
    run,
)

pytestmark = [needs_qemu, pytest.mark.interop]
SIZE = 5 << 20
QEMU_WRITES = ("write -P 0x11 0 64k", "write -P 0x22 100k 7k", "write -P 0x33 3M 1M", "write -z 1M 128k")
CID = re.compile(rb"CID=[0-9a-f]+\n")
DESC_END = 21 * 512  # header sector, then 20 sectors of embedded descriptor


def without_cid(raw: bytes) -> bytes:
    """A file with its (random) CID blanked: the descriptor text up to its NUL padding, the rest as is."""
    if raw[:4] == b"KDMV":
        return raw[:512] + without_cid(raw[512:DESC_END]) + raw[DESC_END:]
    return CID.sub(b"CID=x\n", raw.split(b"\0")[0])


def qemu_image(tmp_path: Path, subformat: str, *opts: str) -> Path:
    path = tmp_path / "q.vmdk"
    run(QEMU_IMG, "create", "-q", "-f", "vmdk", "-o", ",".join((f"subformat={subformat}", *opts)), path, SIZE)
    args = [QEMU_IO]
    for cmd in QEMU_WRITES:
        args += ["-c", cmd]
    run(*args, path, check=False)  # streamOptimized refuses the partial and the repeated writes, as it should
    return path


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_reads_what_qemu_wrote(tmp_path: Path, subformat: str) -> None:
    path = qemu_image(tmp_path, subformat)
    assert bg_read_all(path) == qemu_raw(path, tmp_path / "ref.raw")


def test_reads_zeroed_grains(tmp_path: Path) -> None:
    path = qemu_image(tmp_path, "monolithicSparse", "zeroed_grain=on")
    assert bg_read_all(path) == qemu_raw(path, tmp_path / "ref.raw")


def test_reads_stream_made_by_convert(tmp_path: Path) -> None:
    """An OVA-style streamOptimized image (compressed grains, markers) from qemu-img convert."""
    rnd = random.Random(7)
    src = tmp_path / "src.raw"
    data = bytearray(SIZE)
    for off in range(0, SIZE, 1 << 20):
        data[off + 4097:off + 4097 + 200000] = rnd.randbytes(200000)
    src.write_bytes(data)
    out = tmp_path / "s.vmdk"
    run(QEMU_IMG, "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, out)
    assert bg_read_all(out) == bytes(data)


def _patterned_writes(rnd: random.Random, size: int) -> list[tuple[int, bytes]]:
    writes = []
    for _ in range(24):
        length = rnd.choice((512, 4096, 65536, 70000, 200000))
        off = rnd.randrange(0, size - length)
        writes.append((off, rnd.randbytes(length)))
    return writes


async def _bg_write(path: Path, writes: list[tuple[int, bytes]], zero: tuple[int, int]) -> None:
    session = Session()
    try:
        blk = await open_blk(session, path)
        for off, data in writes:
            await blk.pwritev(off, memoryview(data))
        await blk.pwrite_zeroes(*zero)
        await blk.flush()
    finally:
        await session.close()


@pytest.mark.parametrize("subformat", [*SUBFORMATS, "monolithicSparse,zeroed_grain=on",
                                       "streamOptimized,zeroed_grain=on"])
def test_qemu_checks_and_compares_what_we_wrote(tmp_path: Path, subformat: str) -> None:
    rnd = random.Random(subformat)
    path = tmp_path / "b.vmdk"
    subformat, _, extra = subformat.partition(",")
    bg_create(path, SIZE, subformat=subformat, **dict([extra.split("=")] if extra else []))
    writes = _patterned_writes(rnd, SIZE)
    zero = (2 << 20, 192 << 10)
    asyncio.run(_bg_write(path, writes, zero))
    ref = bytearray(SIZE)
    for off, data in writes:
        ref[off:off + len(data)] = data
    ref[zero[0]:zero[0] + zero[1]] = bytes(zero[1])
    raw = tmp_path / "ref.raw"
    raw.write_bytes(ref)
    assert run(QEMU_IMG, "check", path).returncode == 0
    result = run(QEMU_IMG, "compare", "-f", "vmdk", "-F", "raw", path, raw, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert bg_read_all(path) == bytes(ref)


@pytest.mark.parametrize("opts", [
    "subformat=monolithicSparse",
    "subformat=monolithicFlat,adapter_type=lsilogic,hwversion=7",
    "subformat=twoGbMaxExtentSparse,toolsversion=10240,compat6=on",
    "subformat=twoGbMaxExtentFlat,adapter_type=legacyESX",
    "subformat=streamOptimized,zeroed_grain=on",
    "zeroed_grain=on,adapter_type=buslogic",
])
def test_create_makes_the_files_qemu_makes(tmp_path: Path, opts: str) -> None:
    """Same file names, sizes and bytes as qemu-img create, but for the random CID."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    size = (4 << 30) + (5 << 20) if "twoGb" in opts else SIZE  # two extents when split
    run(QEMU_IMG, "create", "-q", "-f", "vmdk", "-o", opts, theirs / "d.vmdk", size)
    run(BLOCKGRAPH, "img", "create", "-q", "-f", "vmdk", "-o", opts, ours / "d.vmdk", size)
    names = sorted(p.name for p in theirs.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names
    for name in names:
        a, b = ours / name, theirs / name
        if a.stat().st_size > 1 << 20:  # a flat extent: only its size
            assert a.stat().st_size == b.stat().st_size, name
            continue
        raw_a, raw_b = a.read_bytes(), b.read_bytes()
        assert without_cid(raw_a) == without_cid(raw_b), name
        if raw_b[:4] == b"KDMV":
            assert len(raw_a) == len(raw_b), name


def test_create_with_backing_as_qemu(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    run(QEMU_IMG, "create", "-q", "-f", "vmdk", base, SIZE)
    run(QEMU_IO, "-c", "write -P 0x5a 0 1M", base)
    over = tmp_path / "over.vmdk"
    bg_create(over, SIZE, backing_file="base.vmdk", backing_fmt="vmdk")
    info = json.loads(run(QEMU_IMG, "info", "--output=json", over).stdout)
    base_cid = json.loads(run(QEMU_IMG, "info", "--output=json", base).stdout)["format-specific"]["data"]["cid"]
    assert info["backing-filename"] == "base.vmdk"
    assert info["format-specific"]["data"]["parent-cid"] == base_cid
    run(QEMU_IO, "-c", "write -P 0x66 64k 4k", over)
    assert bg_read_all(over) == qemu_raw(over, tmp_path / "ref.raw")
    assert bg_read_all(over)[:64 << 10] == b"\x5a" * (64 << 10)


def test_cid_changes_on_first_write_and_breaks_stale_children(tmp_path: Path) -> None:
    """As QEMU: writing the parent gives it a new CID, and the child then refuses to read through it."""
    base = tmp_path / "base.vmdk"
    bg_create(base, SIZE)
    over = tmp_path / "over.vmdk"
    run(QEMU_IMG, "create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", over)
    assert run(QEMU_IO, "-r", "-c", "read 0 4k", over).returncode == 0
    asyncio.run(_bg_write(base, [(0, b"x" * 512)], (4096, 512)))
    assert "Invalid argument" in run(QEMU_IO, "-r", "-c", "read 0 4k", over, check=False).stdout
    with pytest.raises(Exception, match="parentCID"):
        bg_read_all(over)


@pytest.mark.parametrize("subformat", ("monolithicSparse", "twoGbMaxExtentFlat", "streamOptimized"))
def test_info_and_map_match_qemu(tmp_path: Path, subformat: str) -> None:
    """img info (probed, human and JSON) and img map show what qemu-img shows."""
    path = qemu_image(tmp_path, subformat, "zeroed_grain=on" if subformat != "twoGbMaxExtentFlat" else
                      "adapter_type=ide")
    for argv in (["info", path], ["info", "--output=json", path], ["map", "--output=json", path]):
        expected = run(QEMU_IMG, *argv).stdout
        got = run(BLOCKGRAPH, "img", *argv).stdout
        if argv[0] == "map" and subformat == "twoGbMaxExtentFlat":
            continue  # host filesystem allocation of the flat file decides the zero flags
        assert got == expected, argv


def test_copy_on_write_from_a_qemu_parent(tmp_path: Path) -> None:
    """Partial-grain writes to an overlay copy the rest of the grain from the parent; qemu-img agrees."""
    base = tmp_path / "base.vmdk"
    run(QEMU_IMG, "create", "-q", "-f", "vmdk", base, SIZE)
    run(QEMU_IO, "-c", "write -P 0x5a 0 2M", base)
    over = tmp_path / "over.vmdk"
    bg_create(over, SIZE, backing_file="base.vmdk", backing_fmt="vmdk")
    asyncio.run(_bg_write(over, [(70000, b"\x01" * 1000), (3 << 20, b"\x02" * 512)], (1 << 20, 64 << 10)))
    expected = bytearray(SIZE)
    expected[:2 << 20] = b"\x5a" * (2 << 20)
    expected[70000:71000] = b"\x01" * 1000
    expected[3 << 20:(3 << 20) + 512] = b"\x02" * 512
    expected[1 << 20:(1 << 20) + (64 << 10)] = bytes(64 << 10)
    assert qemu_raw(over, tmp_path / "ref.raw") == bytes(expected)
    assert run(QEMU_IMG, "check", over).returncode == 0
    assert bg_read_all(over) == bytes(expected)


@pytest.mark.parametrize("argv", [
    ["-o", "adapter_type=lsilogic,subformat=monolithicFlat", "x.vmdk", "1M"],
    ["-o", "zeroed_grain=on,toolsversion=5,hwversion=7", "x.vmdk", "1M"],
    ["-o", "subformat=foo", "x.vmdk", "1M"],
    ["-o", "compat6=on,hwversion=7", "x.vmdk", "1M"],
    ["-o", "subformat=twoGbMaxExtentFlat,zeroed_grain=on", "x.vmdk", "1M"],
    ["-b", "base.vmdk", "-F", "raw", "x.vmdk"],
    ["-o", "help"],
])
def test_create_messages_match_qemu(tmp_path: Path, argv: list[str]) -> None:
    """The Formatting line (defaults included), -o help and the refusals, as qemu-img prints them."""
    run(QEMU_IMG, "create", "-q", "-f", "vmdk", tmp_path / "base.vmdk", "1M")
    theirs = run(QEMU_IMG, "create", "-f", "vmdk", *argv, check=False, cwd=tmp_path)
    ours = run(BLOCKGRAPH, "img", "create", "-f", "vmdk", *argv, check=False, cwd=tmp_path)
    assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)
