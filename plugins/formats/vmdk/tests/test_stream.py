"""streamOptimized details: VMware's layout (directory at the end, footer), our footer, appending, corruption."""

from __future__ import annotations

import asyncio
import random
import struct
import zlib
from pathlib import Path

import pytest
from blockgraph.errors import BlockIOError
from blockgraph.perms import Perm
from blockgraph.session import Session
from vmdk_helpers import QEMU_IMG, bg_create, bg_read_all, needs_qemu, open_blk, qemu_raw, run

GRAIN = 65536


def vmware_stream(path: Path, grains: dict[int, bytes], capacity_grains: int = 64) -> None:
    """A stream as VMware's exporters lay it out: header with GD_AT_END, grain markers, GT/GD markers, footer, EOS."""
    desc = ('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="streamOptimized"\n'
            f'RW {capacity_grains * 128} SPARSE "x.vmdk"\n').encode().ljust(1024, b"\0")

    def header(gd: int) -> bytes:
        body = struct.pack("<IIQQQQIQQQc4sH", 3, 0x30001, capacity_grains * 128, 128, 1, 2, 512, 0, gd, 3, b"\0",
                           b"\n \r\n", 1)
        return (b"KDMV" + body).ljust(512, b"\0")

    def meta(n: int, kind: int) -> bytes:
        return struct.pack("<QII", n, 0, kind).ljust(512, b"\0")

    out = bytearray(header(0xFFFFFFFFFFFFFFFF) + desc)
    gt = [0] * 512
    for index, data in sorted(grains.items()):
        comp = zlib.compress(data)
        gt[index] = len(out) // 512
        rec = struct.pack("<QI", index * 128, len(comp)) + comp
        out += rec + bytes(-len(rec) % 512)
    out += meta(4, 1)
    gt_at = len(out) // 512
    out += struct.pack("<512I", *gt)
    out += meta(1, 2)
    gd_at = len(out) // 512
    out += struct.pack("<I", gt_at).ljust(512, b"\0")
    out += meta(1, 3) + header(gd_at) + meta(0, 0)
    path.write_bytes(out)


def test_reads_vmware_layout(tmp_path: Path) -> None:
    rnd = random.Random(3)
    grains = {0: rnd.randbytes(GRAIN), 5: b"\x11" * GRAIN, 63: rnd.randbytes(1000).ljust(GRAIN, b"\0")}
    path = tmp_path / "vm.vmdk"
    vmware_stream(path, grains)
    expected = bytearray(64 * GRAIN)
    for i, data in grains.items():
        expected[i * GRAIN:(i + 1) * GRAIN] = data
    assert bg_read_all(path) == bytes(expected)


@needs_qemu
def test_vmware_layout_agrees_with_qemu(tmp_path: Path) -> None:
    path = tmp_path / "vm.vmdk"
    vmware_stream(path, {1: b"\x22" * GRAIN, 2: bytes(range(256)) * 256})
    assert bg_read_all(path) == qemu_raw(path, tmp_path / "ref.raw")


async def _write(path: Path, writes: list[tuple[int, bytes]]) -> None:
    session = Session()
    try:
        blk = await open_blk(session, path)
        for off, data in writes:
            await blk.pwritev(off, memoryview(data))
    finally:
        await session.close()


def test_footer_at_close_and_appending_later(tmp_path: Path) -> None:
    path = tmp_path / "s.vmdk"
    bg_create(path, 4 << 20, subformat="streamOptimized")
    empty = path.stat().st_size
    asyncio.run(_write(path, [(0, b"\x01" * GRAIN), (GRAIN + 100, b"\x02" * 300)]))
    raw = path.read_bytes()
    assert raw[-1536:-1520] == struct.pack("<QII", 1, 0, 3)  # footer marker
    assert raw[-1024:-1020] == b"KDMV" and struct.unpack_from("<Q", raw, len(raw) - 1024 + 56)[0] == 0x1A
    assert raw[-512:] == bytes(512)  # end of stream
    size1 = len(raw)
    assert size1 > empty
    asyncio.run(_write(path, [(3 * GRAIN, b"\x03" * GRAIN)]))
    raw2 = path.read_bytes()
    assert raw2[-1536:-1520] == struct.pack("<QII", 1, 0, 3)
    assert len(raw2) < size1 + GRAIN // 2  # the old footer was overwritten, not left behind
    expected = bytearray(4 << 20)
    expected[:GRAIN] = b"\x01" * GRAIN
    expected[GRAIN + 100:GRAIN + 400] = b"\x02" * 300
    expected[3 * GRAIN:4 * GRAIN] = b"\x03" * GRAIN
    assert bg_read_all(path) == bytes(expected)


@needs_qemu
def test_qemu_reads_our_stream_and_its_footer(tmp_path: Path) -> None:
    path = tmp_path / "s.vmdk"
    bg_create(path, 4 << 20, subformat="streamOptimized")
    data = random.Random(1).randbytes(3 * GRAIN + 777)
    asyncio.run(_write(path, [(12345, data)]))
    assert run(QEMU_IMG, "check", path).returncode == 0
    assert qemu_raw(path, tmp_path / "ref.raw")[12345:12345 + len(data)] == data


def test_corrupt_compressed_grain_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "vm.vmdk"
    vmware_stream(path, {0: b"\x33" * GRAIN})
    raw = bytearray(path.read_bytes())
    grain_at = 3 * 512
    raw[grain_at + 12:grain_at + 20] = b"garbage!"
    path.write_bytes(raw)
    with pytest.raises(BlockIOError, match=f"compressed grain at offset {grain_at} .* does not decompress"):
        bg_read_all(path)
    struct.pack_into("<I", raw, grain_at + 8, 10 * GRAIN)
    path.write_bytes(raw)
    with pytest.raises(BlockIOError, match="invalid size"):
        bg_read_all(path)


def test_broken_footer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm.vmdk"
    vmware_stream(path, {0: b"\x33" * GRAIN})
    raw = bytearray(path.read_bytes())
    raw[-1024:-1020] = bytes(4)  # the footer's "KDMV" magic, zeroed
    path.write_bytes(raw)
    from blockgraph.errors import OpenError

    with pytest.raises(OpenError, match="Invalid footer"):
        bg_read_all(path)


def test_corrupt_grain_among_many_is_named(tmp_path: Path) -> None:
    """Adjacent grains are read and inflated together; a bad one among them still gets its own clear error."""
    path = tmp_path / "vm.vmdk"
    vmware_stream(path, {i: bytes([i]) * GRAIN for i in range(8)})
    raw = bytearray(path.read_bytes())
    third = raw.index(struct.pack("<Q", 3 * 128))  # the marker of grain 3
    raw[third + 14:third + 22] = b"garbage!"
    path.write_bytes(raw)
    with pytest.raises(BlockIOError, match=f"compressed grain at offset {third} "):
        bg_read_all(path)


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized", "twoGbMaxExtentSparse"])
def test_live_reopen_read_write_and_back(tmp_path: Path, subformat: str) -> None:
    path = tmp_path / "r.vmdk"
    bg_create(path, 4 << 20, subformat=subformat)

    async def go() -> None:
        session = Session()
        try:
            node = await session.open_node({"driver": "vmdk", "read-only": True,
                                            "file": {"driver": "file", "filename": str(path)}})
            from blockgraph.backend import BlockBackend

            await session.reopen(node, read_only=False)
            blk = await BlockBackend.attach_new(session, node)
            await blk.pwritev(GRAIN + 10, memoryview(b"\x77" * 1000))
            await blk.flush()
            blk.set_perm(Perm.CONSISTENT_READ, Perm.ALL)  # drop the write permission, keep the node open
            await session.reopen(node, read_only=True)
            assert node.read_only and not node.closed
            buf = bytearray(2000)
            await blk.preadv(GRAIN, memoryview(buf))
            assert buf[10:1010] == b"\x77" * 1000
        finally:
            await session.close()

    asyncio.run(go())
    expected = bytearray(4 << 20)
    expected[GRAIN + 10:GRAIN + 1010] = b"\x77" * 1000
    assert bg_read_all(path) == bytes(expected)


@needs_qemu
def test_writing_a_vmware_layout_stream(tmp_path: Path) -> None:
    """New grains go over the old footer; the new footer keeps pointing at the directory; qemu-img agrees."""
    path = tmp_path / "vm.vmdk"
    vmware_stream(path, {1: b"\x22" * GRAIN})
    asyncio.run(_write(path, [(4 * GRAIN, b"\x44" * GRAIN), (100, b"\x01" * 10)]))
    expected = bytearray(64 * GRAIN)
    expected[100:110] = b"\x01" * 10
    expected[GRAIN:2 * GRAIN] = b"\x22" * GRAIN
    expected[4 * GRAIN:5 * GRAIN] = b"\x44" * GRAIN
    assert qemu_raw(path, tmp_path / "ref.raw") == bytes(expected)
    assert bg_read_all(path) == bytes(expected)
    assert run(QEMU_IMG, "check", path).returncode == 0
