"""Rebuilding a refcount structure from an in-memory count (QEMU's rebuild_refcount_structure), for
``check -r all`` and for ``amend -o refcount_bits=N``.

Refcount blocks are written as slices of the count, each in a cluster allocated in the count itself; then
the table, in as many clusters as it needs, placed where the count has room (more blocks may follow from
that placement, so this repeats until the table stops growing); then the header switches to the table.
The old structure stays allocated in the new one until the leak repair that follows frees it.
"""

from __future__ import annotations

import struct
from array import array
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .check import Checker
    from .image import Image


def decode_block(rc: Any, blk: bytearray) -> list[int]:
    """Every entry of one refcount block (a snapshot: repairs made later do not change it)."""
    o = rc.order
    if o >= 3:
        return list(struct.unpack(f">{rc.entries}{'BHIQ'[o - 3]}", blk))
    return [rc._read_entry(blk, i) for i in range(rc.entries)]


def _alloc_imrt(refs: array, count: int, first_free: int) -> tuple[int, int]:
    """``count`` contiguous free clusters in the in-memory count (grown at the end if needed), now used."""
    cluster, run, first_gap = first_free, 0, True
    while cluster < len(refs) and run < count:
        if not refs[cluster]:
            run += 1
            if first_gap:
                first_free, first_gap = cluster, False
        else:
            run = 0
        cluster += 1
    if run < count:
        refs.extend(array("Q", bytes(8 * (cluster + count - run - len(refs)))))
    start = cluster - run
    for k in range(start, start + count):
        refs[k] = 1
    return start, first_free


async def rebuild_refcounts(img: Image, c: Checker, header_order: bool = False) -> None:
    """Write a new refcount structure from the in-memory count (QEMU's rebuild_refcount_structure).

    The old structure stays allocated in the new one; the leak check that follows frees it.
    """
    rc, refs, cs = img.rc, c.refs, img.cs
    per = rc.entries
    reftable: list[int] = []

    async def write_blocks(first: int, end: int) -> bool:
        grown, first_free, cluster = False, 0, first
        while cluster < end:
            if cluster >= len(refs) or not refs[cluster]:
                cluster += 1
                continue
            idx = cluster // per
            start = idx * per
            if idx < len(reftable) and reftable[idx]:
                off = reftable[idx]
            else:
                at, first_free = _alloc_imrt(refs, 1, max(first_free, start))
                off = at * cs
                end = max(end, at + 1)
                if len(reftable) <= idx:
                    reftable.extend([0] * (-(-(idx + 1) * 8 // cs) * cs // 8 - len(reftable)))
                    grown = True
                reftable[idx] = off
            blk = bytearray(cs)
            for k in range(start, min(start + per, len(refs))):
                if refs[k]:
                    rc._write_entry(blk, k - start, refs[k])
            await img.file.pwritev(off, memoryview(blk))
            cluster = start + per
        return grown

    await write_blocks(0, len(refs))
    while True:
        nclusters = -(-len(reftable) * 8 // cs)
        start, _ = _alloc_imrt(refs, nclusters, 0)
        if not await write_blocks(start, start + nclusters):
            break
    await img.file.pwritev(start * cs, memoryview(struct.pack(f">{len(reftable)}Q", *reftable)))
    await img.file.flush()
    img.h.refcount_table_offset, img.h.refcount_table_clusters = start * cs, nclusters
    if header_order:  # a new refcount width: order and table switch in one header write
        await img.file.pwritev(0, memoryview(img.h.pack()))
    else:
        await img.file.pwritev(48, memoryview(struct.pack(">QI", start * cs, nclusters)))
    await img.file.flush()
    rc.table = reftable
    rc.cache.entries.clear()
    rc.cache.dirty.clear()
    rc.free_hint = 0
