"""Extent kinds and access modes: RW/RDONLY/NOACCESS, FLAT/VMFS/ZERO, and COWD (vmfsSparse) sparse extents."""

from __future__ import annotations

import asyncio
import errno
import struct
from pathlib import Path

import pytest
from blockgraph.errors import BlockIOError, OpenError
from blockgraph.session import Session
from vmdk_helpers import QEMU_IMG, bg_read_all, open_blk, qemu_raw

KIB = 1024


def descriptor(lines: list[str], create_type: str = "monolithicFlat") -> str:
    return ("# Disk DescriptorFile\nversion=1\nCID=abc\nparentCID=ffffffff\n"
            f'createType="{create_type}"\n' + "".join(f"{x}\n" for x in lines))


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    (tmp_path / "rw.raw").write_bytes(b"\x01" * 4 * KIB)
    (tmp_path / "ro.raw").write_bytes(b"\x02" * 8 * KIB)
    (tmp_path / "na.raw").write_bytes(b"\x03" * 4 * KIB)
    (tmp_path / "vmfs.raw").write_bytes(b"\x04" * 4 * KIB)
    path = tmp_path / "d.vmdk"
    path.write_text(descriptor(['RW 8 FLAT "rw.raw" 0', 'RDONLY 8 FLAT "ro.raw" 8', "RW 8 ZERO",
                                'NOACCESS 8 FLAT "na.raw" 0', 'RW 8 VMFS "vmfs.raw"']))
    return path


async def _io(path: Path, op: str, offset: int, data: bytes = b"") -> bytes:
    session = Session()
    try:
        blk = await open_blk(session, path, read_only=op == "read")
        if op == "write":
            await blk.pwritev(offset, memoryview(data))
            return b""
        buf = bytearray(len(data) or 4 * KIB)
        await blk.preadv(offset, memoryview(buf))
        return bytes(buf)
    finally:
        await session.close()


def test_access_modes_and_types(mixed: Path) -> None:
    assert asyncio.run(_io(mixed, "read", 0)) == b"\x01" * 4 * KIB
    assert asyncio.run(_io(mixed, "read", 4 * KIB)) == b"\x02" * 4 * KIB  # RDONLY, 8 sectors into its file
    assert asyncio.run(_io(mixed, "read", 8 * KIB)) == bytes(4 * KIB)  # ZERO
    assert asyncio.run(_io(mixed, "read", 16 * KIB)) == b"\x04" * 4 * KIB  # VMFS: flat at offset 0
    with pytest.raises(BlockIOError) as exc:
        asyncio.run(_io(mixed, "read", 12 * KIB))
    assert exc.value.errno == errno.EACCES and "NOACCESS" in str(exc.value)


def test_writes_honour_access(mixed: Path) -> None:
    asyncio.run(_io(mixed, "write", 512, b"\x09" * 512))
    assert (mixed.parent / "rw.raw").read_bytes()[512:1024] == b"\x09" * 512
    for offset in (4 * KIB, 8 * KIB, 12 * KIB):
        with pytest.raises(BlockIOError) as exc:
            asyncio.run(_io(mixed, "write", offset, b"\x09" * 512))
        assert exc.value.errno == errno.EACCES
    assert (mixed.parent / "ro.raw").read_bytes() == b"\x02" * 8 * KIB
    assert (mixed.parent / "na.raw").read_bytes() == b"\x03" * 4 * KIB


def cowd_extent(path: Path, grains: dict[int, bytes], sectors: int = 2048, granularity: int = 8) -> None:
    """A COWD (ESX vmfsSparse) extent: header, one 4096-entry grain table, then the grains."""
    gt_sectors = 4096 * 4 // 512
    gd_at, gt_at = 4, 5
    data_at = gt_at + gt_sectors
    gt = [0] * 4096
    body = bytearray()
    for i, data in sorted(grains.items()):
        gt[i] = data_at + len(body) // 512
        body += data.ljust(granularity * 512, b"\0")
    header = b"COWD" + struct.pack("<IIIIIIIIII", 1, 3, sectors, granularity, gd_at, 1, data_at + len(body) // 512,
                                   0, 0, 0)
    out = bytearray(header.ljust(gd_at * 512, b"\0"))
    out += struct.pack("<I", gt_at).ljust(512, b"\0")
    out += struct.pack("<4096I", *gt)
    out += body
    path.write_bytes(out)


def test_vmfs_sparse_cowd_extent(tmp_path: Path) -> None:
    cowd_extent(tmp_path / "delta.vmdk", {0: b"\x44" * 4096, 3: b"\x55" * 4096})
    path = tmp_path / "d.vmdk"
    path.write_text(descriptor(['RW 2048 VMFSSPARSE "delta.vmdk"'], create_type="vmfsSparse"))
    expected = bytearray(2048 * 512)
    expected[:4096] = b"\x44" * 4096
    expected[3 * 4096:4 * 4096] = b"\x55" * 4096
    assert bg_read_all(path) == bytes(expected)
    asyncio.run(_io(path, "write", 5 * 4096 + 100, b"\x66" * 10))
    expected[5 * 4096 + 100:5 * 4096 + 110] = b"\x66" * 10
    assert bg_read_all(path) == bytes(expected)


def test_cid_rewrite_keeps_other_bytes(tmp_path: Path) -> None:
    """The first write changes only the CID: a Latin-1 comment and a UTF-8 extent name survive unchanged."""
    (tmp_path / "d\u00e9-flat.raw").write_bytes(bytes(4 * KIB))
    path = tmp_path / "d.vmdk"
    raw = descriptor(['RW 8 FLAT "d\u00e9-flat.raw" 0']).encode() + b"# caf\xe9\n"
    path.write_bytes(raw)
    asyncio.run(_io(path, "write", 0, b"\x01" * 512))
    new = path.read_bytes()
    assert new.replace(new.split(b"CID=")[1].split(b"\n")[0], b"abc", 1) == raw
    assert b"CID=abc\n" not in new


def sesparse_extent(path: Path, grains: dict[int, bytes], zero: tuple[int, ...] = (), sectors: int = 2048) -> None:
    """An ESXi seSparse delta: const header, volatile header, one directory sector, one 4096-entry table, grains."""
    vol_at, gd_at, gts_at = 1, 2, 3
    grains_at = gts_at + 64
    const = struct.pack("<26Q", 0xCAFEBABE, 0x0000000200000001, sectors, 8, 64, 0, 0, 0, 0, 0, vol_at, 1,
                        0, 0, 0, 0, gd_at, 1, gts_at, 64, 0, 0, 0, 0, grains_at, 0).ljust(512, b"\0")
    volatile = struct.pack("<4Q", 0xCAFECAFE, 0, 0, 0).ljust(512, b"\0")
    gd = struct.pack("<Q", 0x1000000000000000).ljust(512, b"\0")
    gt = [0] * 4096
    body = bytearray()
    for cluster, (index, data) in enumerate(sorted(grains.items())):
        gt[index] = 0x3000000000000000 | ((cluster & 0xFFF) << 48) | (cluster >> 12)
        body += data.ljust(4096, b"\0")
    for index in zero:
        gt[index] = 0x2000000000000000
    path.write_bytes(const + volatile + gd + struct.pack("<4096Q", *gt) + body)


def test_sesparse_extent_reads_as_qemu(tmp_path: Path) -> None:
    sesparse_extent(tmp_path / "delta-sesparse.vmdk", {0: b"\x11" * 4096, 9: b"\x22" * 4096}, zero=(3,))
    path = tmp_path / "d.vmdk"
    path.write_text(descriptor(['RW 2048 SESPARSE "delta-sesparse.vmdk"'], create_type="seSparse"))
    expected = bytearray(2048 * 512)
    expected[:4096] = b"\x11" * 4096
    expected[9 * 4096:10 * 4096] = b"\x22" * 4096
    assert bg_read_all(path) == bytes(expected)
    if QEMU_IMG:
        assert qemu_raw(path, tmp_path / "ref.raw") == bytes(expected)
    with pytest.raises(OpenError, match="No write support for seSparse images available"):
        asyncio.run(_io(path, "write", 0, b"x" * 512))
