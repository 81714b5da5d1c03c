"""Extent kinds and access modes: RW/RDONLY/NOACCESS, FLAT/VMFS/ZERO, and COWD (vmfsSparse) sparse extents."""

from __future__ import annotations

import asyncio
import errno
import struct
from pathlib import Path

import pytest
from blockgraph.errors import BlockIOError
from blockgraph.session import Session
from vmdk_helpers import bg_read_all, open_blk

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
