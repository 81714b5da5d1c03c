"""Opening a sparse extent: header (or stream footer) validation with QEMU's messages, then its directories."""

from __future__ import annotations

from typing import Any

from blockgraph.errors import OpenError

from .format import (
    GD_AT_END,
    MAGIC_KDMV,
    MARKER_EOS,
    MARKER_FOOTER,
    MAX_GD_ENTRIES,
    MAX_GRAIN_SECTORS,
    SECTOR,
    SparseHeader,
    parse_marker,
)
from .sparse import SparseExtent


async def _footer(child: Any, flen: int) -> SparseHeader:
    """The header copy in a stream's footer: footer marker, header, end-of-stream marker, in the last 3 sectors."""
    end = flen // SECTOR * SECTOR
    if end < 4 * SECTOR:
        raise OpenError("Invalid footer")
    tail = bytearray(3 * SECTOR)
    await child.preadv(end - 3 * SECTOR, memoryview(tail))
    if parse_marker(tail)[1:] != (0, MARKER_FOOTER) or tail[SECTOR:SECTOR + 4] != MAGIC_KDMV or \
            parse_marker(tail[2 * SECTOR:]) != (0, 0, MARKER_EOS):
        raise OpenError("Invalid footer")
    hdr = SparseHeader.parse(bytes(tail[SECTOR:2 * SECTOR]))
    if hdr.gd_offset == GD_AT_END:
        raise OpenError("Invalid footer")
    return hdr


async def open_sparse(child: Any, head: bytes, *, start: int, access: str, type_name: str, writable: bool,
                      node_name: str) -> SparseExtent:
    hdr = SparseHeader.parse(head)
    flen = child.getlength()
    if not hdr.cowd and hdr.capacity == 0 and hdr.desc_offset:
        raise OpenError(f"VMDK extent '{child.node.filename}' holds a descriptor, not data: nested descriptors "
                        f"are not supported")
    if not hdr.cowd and hdr.gd_offset == GD_AT_END:
        footer = await _footer(child, flen)
        footer.flags = footer.flags or hdr.flags
        hdr = footer
    if not hdr.cowd:
        if hdr.version > 3:
            raise OpenError(f"Unsupported VMDK version {hdr.version}")
        if hdr.version == 3 and writable and not hdr.compressed:
            raise OpenError("VMDK version 3 must be read only")
        if hdr.num_gtes_per_gt > 512:
            raise OpenError("L2 table size too big")
    if hdr.num_gtes_per_gt * hdr.granularity == 0:
        raise OpenError("L1 entry size is invalid")
    if not hdr.cowd and (flen + SECTOR - 1) // SECTOR < hdr.grain_offset:
        raise OpenError(f"File truncated, expecting at least {hdr.grain_offset * SECTOR} bytes")
    if hdr.granularity > MAX_GRAIN_SECTORS:
        raise OpenError("Invalid granularity, image may be corrupt")
    if hdr.gd_entries > MAX_GD_ENTRIES:
        raise OpenError("L1 size too big")
    if hdr.capacity > hdr.gd_entries * hdr.num_gtes_per_gt * hdr.granularity:
        raise OpenError(f"VMDK extent '{child.node.filename}': capacity {hdr.capacity} sectors exceeds what its "
                        f"grain directory maps")
    ext = SparseExtent(header=hdr, gd_offset=hdr.gd_offset, start=start, length=hdr.capacity * SECTOR,
                       access=access, type_name=type_name, child=child, node_name=node_name)
    await ext.load(writable)
    return ext
