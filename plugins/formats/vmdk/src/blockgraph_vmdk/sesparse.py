"""seSparse extents (ESXi snapshot deltas), read-only as in QEMU.

A constant header (magic 0xcafebabe), a volatile header (0xcafecafe), and
64-bit directory and table entries: a directory entry holds 0x1 in its top
nibble and a table number; a table entry's top nibble says unallocated (0),
zero (1: unmapped, 2: zeroed) or allocated (3, with a cluster number split
across its bits). QEMU accepts only the layout ESXi writes (4 KiB grains,
4096-entry tables, no flags) and so does this.
"""

from __future__ import annotations

import errno
import struct
import sys
from array import array
from typing import Any

from blockgraph.errors import OpenError

from .extent import DATA, UNALLOC, ZEROED
from .format import SECTOR, SparseHeader
from .sparse import SparseExtent

CONST_MAGIC = 0xCAFEBABE
VOLATILE_MAGIC = 0xCAFECAFE
_CONST = struct.Struct("<26Q")  # then 304 bytes of padding
_VOLATILE = struct.Struct("<4Q")  # then 480 bytes of padding


def is_sesparse(head: bytes) -> bool:
    return len(head) >= 8 and struct.unpack_from("<Q", head)[0] == CONST_MAGIC


class SeSparseExtent(SparseExtent):
    entry_size = 8

    def __init__(self, *, tables_offset: int, grains_offset: int, gd_entries: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.tables_offset, self.grains_offset, self.gd_entries = tables_offset, grains_offset, gd_entries

    async def load(self, writable: bool) -> None:
        self.gd = await self._read_dir(self.gd_offset, self.gd_entries, self.child.getlength(), "l1 table")

    def _entries(self, raw: bytearray) -> array:
        table = array("Q")
        table.frombytes(bytes(raw))
        if sys.byteorder != "little":
            table.byteswap()
        return table

    def _gt_sector(self, gd_i: int, entry: int, op: str, voff: int) -> int:
        if not entry:
            return 0
        if entry & 0xFFFFFFFF00000000 != 0x1000000000000000:
            raise self.io_error(errno.EIO, op, voff, 0, f"seSparse grain directory entry {gd_i} of "
                                                        f"'{self.filename}' is invalid ({entry:#x})")
        return self.tables_offset + (entry & 0xFFFFFFFF) * (self.gtes * 8 // SECTOR)

    def _decode(self, gte: int) -> tuple[str, int]:
        kind = gte >> 60
        if kind == 0 and gte == 0:
            return UNALLOC, 0
        if kind in (1, 2):
            return ZEROED, 0
        if kind == 3:
            cluster = ((gte & 0x0FFF000000000000) >> 48) | ((gte & 0x0000FFFFFFFFFFFF) << 12)
            return DATA, (self.grains_offset + cluster * self.hdr.granularity) * SECTOR
        raise self.io_error(errno.EIO, "read", self.start, 0,
                            f"seSparse grain table entry {gte:#x} of '{self.filename}' is invalid")


async def open_se_sparse(child: Any, head: bytes, *, start: int, access: str, type_name: str, writable: bool,
                         node_name: str) -> SeSparseExtent:
    if writable:
        raise OpenError("No write support for seSparse images available")
    f = _CONST.unpack_from(head.ljust(SECTOR, b"\0"))
    (magic, version, capacity, grain_size, gt_size, flags, r1, r2, r3, r4, vol_off, _vol_size, *_journal,
     gd_off, gd_size, gts_off, _gts_size, _fb_off, _fb_size, _bm_off, _bm_size, grains_off, _grains_size) = f
    if magic != CONST_MAGIC:
        raise OpenError(f"Bad const header magic: 0x{magic:016x}")
    if version != 0x0000000200000001:
        raise OpenError(f"Unsupported version: 0x{version:016x}")
    if grain_size != 8:
        raise OpenError(f"Unsupported grain size: {grain_size}")
    if gt_size != 64:
        raise OpenError(f"Unsupported grain table size: {gt_size}")
    if flags:
        raise OpenError(f"Unsupported flags: 0x{flags:016x}")
    if r1 or r2 or r3 or r4:
        raise OpenError(f"Unsupported reserved bits: 0x{r1:016x} 0x{r2:016x} 0x{r3:016x} 0x{r4:016x}")
    if any(head[_CONST.size:SECTOR]):
        raise OpenError("Unsupported non-zero const header padding")
    flen = child.getlength()
    if (vol_off + 1) * SECTOR > flen:
        raise OpenError(f"Could not read volatile header from file '{child.node.filename}'")
    vol = bytearray(SECTOR)
    await child.preadv(vol_off * SECTOR, memoryview(vol))
    vmagic, _free_gt, _txn, replay = _VOLATILE.unpack_from(vol)
    if vmagic != VOLATILE_MAGIC:
        raise OpenError(f"Bad volatile header magic: 0x{vmagic:016x}")
    if replay:
        raise OpenError("Image is dirty, Replaying journal not supported")
    if any(vol[_VOLATILE.size:]):
        raise OpenError("Unsupported non-zero volatile header padding")
    gd_entries = gd_size * SECTOR // 8
    if gd_entries > 32 * 1024 * 1024:
        raise OpenError("L1 size too big")
    gtes = gt_size * SECTOR // 8
    if capacity > gd_entries * gtes * grain_size:
        raise OpenError(f"VMDK extent '{child.node.filename}': capacity {capacity} sectors exceeds what its "
                        f"grain directory maps")
    hdr = SparseHeader(1, 0, capacity, grain_size, 0, 0, gtes, 0, gd_off, 0)
    ext = SeSparseExtent(header=hdr, gd_offset=gd_off, start=start, length=capacity * SECTOR, access=access,
                         type_name=type_name, child=child, node_name=node_name, tables_offset=gts_off,
                         grains_offset=grains_off, gd_entries=gd_entries)
    await ext.load(False)
    return ext
