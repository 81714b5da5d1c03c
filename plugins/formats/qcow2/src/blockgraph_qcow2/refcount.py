"""Refcounts: the table, the block cache, cluster allocation and freeing (QEMU's qcow2-refcount.c).

Public API (used by the driver, check, snapshot, amend):

* ``await rc.load()`` reads the refcount table;
* ``await rc.get(cluster_index)`` / ``await rc.set(cluster_index, value)``;
* ``await rc.update(host_offset, length, addend)`` adds ``addend`` to every cluster the byte range touches;
* ``await rc.alloc_clusters(n)`` returns the host offset of ``n`` contiguous new clusters, refcount 1;
* ``await rc.alloc_bytes(n)`` a byte range for a compressed cluster (clusters shared between them);
* ``await rc.flush()`` writes dirty refcount blocks.

New refcount blocks describe themselves; when the table is full it is copied to a larger one at the end of
the file, the header switched in one write, and the old table freed. A refcount block or table reaches the
file before anything that points at a cluster it counts (``l2_cache.depends_on = rc.cache``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from blockgraph.errors import ImageCorrupt

from .cache import MetaCache
from .constants import MAX_HOST_OFFSET, MAX_REFTABLE_BYTES, REFT_OFFSET_MASK

if TYPE_CHECKING:
    from blockgraph.node import Child

    from .header import Header


class Refcounts:
    def __init__(self, file: Child, header: Header, cache_clusters: int, node_name: str = "",
                 write_header_fields: object = None) -> None:
        self.file = file
        self.h = header
        self.cs = header.cluster_size
        self.cbits = header.cluster_bits
        self.order = header.refcount_order
        self.bits = 1 << self.order
        self.max_refcount = (1 << self.bits) - 1
        self.entries = self.cs * 8 // self.bits  # refcount entries per block
        self.cache = MetaCache("refcount", file, self.cs, cache_clusters)
        self.table: list[int] = []
        self.free_hint = 0  # cluster index where free-space search starts
        self.free_byte_offset = 0  # for compressed clusters: the next free byte in a partly used cluster
        self.generation = 0  # bumped whenever the table changes (overlap check cache)
        self.overlap_check: Callable[[int, int], str | None] | None = None  # set by Image
        self.node_name = node_name
        self.write_header_fields = write_header_fields  # async callback(h) persisting refcount table fields

    def corrupt(self, what: str, offset: int | None = None) -> ImageCorrupt:
        return ImageCorrupt(what, node=self.node_name or None, offset=offset)

    async def load(self) -> None:
        h = self.h
        nbytes = h.refcount_table_clusters * self.cs
        if nbytes > MAX_REFTABLE_BYTES:
            raise self.corrupt("Reference count table too large")
        if nbytes == 0:
            raise self.corrupt("Image does not contain a reference count table")
        if h.refcount_table_offset % self.cs:
            raise self.corrupt("Reference count table offset invalid", h.refcount_table_offset)
        if h.refcount_table_offset + nbytes > self.file.getlength():
            raise self.corrupt("Reference count table exceeds the file size", h.refcount_table_offset)
        buf = bytearray(nbytes)
        await self.file.preadv(h.refcount_table_offset, memoryview(buf))
        self.table = list(struct.unpack(f">{nbytes // 8}Q", buf))

    def block_offset(self, rt_index: int) -> int:
        """The host offset of refcount block ``rt_index`` (0 = none), validated."""
        if rt_index >= len(self.table):
            return 0
        off = self.table[rt_index] & REFT_OFFSET_MASK
        if off and off % self.cs:
            raise self.corrupt(f"Refblock offset {off:#x} unaligned (reftable index: {rt_index:#x})")
        if off and off >= MAX_HOST_OFFSET:
            raise self.corrupt(f"Refblock at {off:#x} is past the supported host offset range")
        return off

    # ------------------------------------------------------------ entry access

    def _read_entry(self, blk: bytearray, i: int) -> int:
        o = self.order
        if o == 4:
            return blk[2 * i] << 8 | blk[2 * i + 1]
        if o == 3:
            return blk[i]
        if o == 5:
            return int.from_bytes(blk[4 * i:4 * i + 4], "big")
        if o == 6:
            return int.from_bytes(blk[8 * i:8 * i + 8], "big")
        per = 8 >> o
        return blk[i // per] >> ((i % per) << o) & self.max_refcount

    def _write_entry(self, blk: bytearray, i: int, v: int) -> None:
        o = self.order
        if o >= 3:
            n = 1 << (o - 3)
            blk[n * i:n * i + n] = v.to_bytes(n, "big")
            return
        per = 8 >> o
        shift = (i % per) << o
        blk[i // per] = (blk[i // per] & ~(self.max_refcount << shift)) | (v << shift)

    async def get(self, cluster: int) -> int:
        off = self.block_offset(cluster // self.entries)
        if not off:
            return 0
        blk = await self.cache.get(off)
        return self._read_entry(blk, cluster % self.entries)

    async def set(self, cluster: int, value: int) -> None:
        await self._ensure_block(cluster)
        off = self.block_offset(cluster // self.entries)
        blk = await self.cache.get(off)
        self._write_entry(blk, cluster % self.entries, value)
        self.cache.mark_dirty(off)

    async def update(self, offset: int, length: int, addend: int) -> None:
        """Add ``addend`` to the refcount of every cluster overlapping ``[offset, offset+length)``."""
        if length <= 0:
            return
        first, last = offset >> self.cbits, (offset + length - 1) >> self.cbits
        for c in range(first, last + 1):
            if addend < 0 and not self.block_offset(c // self.entries):
                raise self.corrupt(f"refcount of cluster {c} would become {addend} (out of range)", c << self.cbits)
            await self._ensure_block(c)
            off = self.block_offset(c // self.entries)
            blk = await self.cache.get(off)
            i = c % self.entries
            v = self._read_entry(blk, i) + addend
            if v < 0 or v > self.max_refcount:
                raise self.corrupt(f"refcount of cluster {c} would become {v} (out of range)", c << self.cbits)
            self._write_entry(blk, i, v)
            self.cache.mark_dirty(off)
            if v == 0 and c < self.free_hint:
                self.free_hint = c

    async def flush(self) -> None:
        await self.cache.flush()

    # ------------------------------------------------------------ allocation

    async def alloc_clusters(self, n: int) -> int:
        """Find ``n`` contiguous free clusters, set their refcounts to 1, return the host offset."""
        start = await self.find_free_covered(n)
        await self.set_range(start, n, 1)
        self.free_hint = start + n
        return start << self.cbits

    async def set_range(self, start: int, n: int, value: int) -> None:
        """Set the refcounts of clusters [start, start+n) (their blocks must exist) to ``value``."""
        c, end = start, start + n
        while c < end:
            r, i = divmod(c, self.entries)
            k = min(end - c, self.entries - i)
            off = self.block_offset(r)
            blk = await self.cache.get(off)
            if self.order >= 3:
                w = 1 << (self.order - 3)
                blk[i * w:(i + k) * w] = value.to_bytes(w, "big") * k
            else:
                for j in range(i, i + k):
                    self._write_entry(blk, j, value)
            self.cache.mark_dirty(off)
            c += k

    async def find_free_covered(self, n: int) -> int:
        """The first cluster of ``n`` free contiguous ones whose refcount blocks exist (refcounts untouched)."""
        while True:
            start = await self._find_free(n)
            uncovered = [r for r in range(start // self.entries, (start + n - 1) // self.entries + 1)
                         if not self.block_offset(r)]
            if not uncovered:
                break
            r = uncovered[0]
            await self._new_block(r, max(start, r * self.entries))
        if (start + n) << self.cbits > MAX_HOST_OFFSET:
            raise self.corrupt("Cannot allocate clusters past the supported host offset range")
        self._check_overlap(start << self.cbits, n << self.cbits, "allocation")
        return start

    def _check_overlap(self, host: int, length: int, what: str) -> None:
        """Refcounts that call metadata free would hand it out again: refuse (QEMU's overlap check)."""
        hit = self.overlap_check(host, length) if self.overlap_check is not None else None
        if hit is not None:
            raise self.corrupt(f"Preventing invalid {what} at {host:#x} (overlaps with {hit}); "
                               "the refcounts are inconsistent, run 'qemu-img check -r all'", host)

    async def alloc_bytes(self, size: int) -> int:
        """A byte range for compressed data (QEMU's qcow2_alloc_bytes): packed after the previous one, spilling
        into the next cluster when that one is free; every cluster the range touches gains one reference."""
        cs = self.cs
        off = self.free_byte_offset
        if off and await self.get(off >> self.cbits) >= self.max_refcount:
            off = 0  # the partly used cluster cannot take another reference
        if not off or (off % cs) + size > cs:
            start = await self.find_free_covered(-(-size // cs))
            if not off or -(-off // cs) != start:
                off = start << self.cbits
        await self.update(off, size, 1)
        self.free_hint = max(self.free_hint, -(-(off + size) // cs))
        end = off + size
        self.free_byte_offset = end if end % cs else 0
        return off

    async def _find_free(self, n: int) -> int:
        """The first run of ``n`` clusters with refcount 0 from ``free_hint`` (uncovered ranges count as free)."""
        c = run_start = self.free_hint
        run = 0
        entries = self.entries
        while run < n:
            r, i = divmod(c, entries)
            k = min(n - run, entries - i)
            off = self.block_offset(r)
            if not off:
                run, c = run + k, c + k
                continue
            blk = await self.cache.get(off)
            if self.order >= 3:
                w = 1 << (self.order - 3)
                seg = blk[i * w:(i + k) * w]
                used = len(seg.rstrip(b"\0"))
                last_used = (used - 1) // w if used else -1
            else:
                last_used = -1
                for j in range(k):
                    if self._read_entry(blk, i + j):
                        last_used = j
            if last_used < 0:
                run, c = run + k, c + k
            else:
                c = c + last_used + 1
                run_start, run = c, 0
        return run_start

    async def _new_block(self, rt_index: int, at: int) -> None:
        """Create refcount block ``rt_index`` at cluster ``at`` (inside its own range, so it counts itself)."""
        if rt_index >= len(self.table):
            await self._grow_table(rt_index)
            return
        blk = bytearray(self.cs)
        self._write_entry(blk, at % self.entries, 1)
        off = at << self.cbits
        self._check_overlap(off, self.cs, "refcount block allocation")
        await self.file.pwritev(off, memoryview(blk))
        await self.file.flush()
        await self.file.pwritev(self.h.refcount_table_offset + 8 * rt_index, memoryview(struct.pack(">Q", off)))
        await self.file.flush()
        self.table[rt_index] = off
        self.generation += 1
        await self.cache.new(off, blk)
        self.cache.dirty.discard(off)

    async def _ensure_block(self, cluster: int) -> None:
        r = cluster // self.entries
        if not self.block_offset(r):
            # A refcount set on a cluster whose range has no block: create the block (in a free cluster of the
            # range if there is one, else at the first free cluster anywhere after growing the table).
            await self._new_block(r, cluster if r >= len(self.table) else await self._free_in_range(r, cluster))

    async def _free_in_range(self, r: int, avoid: int) -> int:
        for c in range(r * self.entries, (r + 1) * self.entries):
            if c != avoid:
                return c
        raise self.corrupt("no free cluster for a refcount block")

    async def _grow_table(self, need_index: int) -> None:
        """Copy the table to a larger one (with new blocks for its own clusters) at the end of the file."""
        old_off, old_clusters = self.h.refcount_table_offset, self.h.refcount_table_clusters
        file_end = -(-self.file.getlength() // self.cs)
        start = max(file_end, self.free_hint)
        while True:  # skip clusters already in use past the file end (rare: allocated, not yet written)
            if all([await self.get(c) == 0 for c in range(start, start + 4)]):
                break
            start += 1
        blocks: list[int] = []
        tclusters = max(old_clusters + 1, -(-(need_index + 1) * 8 // self.cs))
        while True:
            area_end = start + len(blocks) + tclusters
            ranges = range(start // self.entries, (area_end - 1) // self.entries + 1)
            new_blocks = [r for r in ranges if not self.block_offset(r)]
            want_entries = max(need_index + 1, (ranges[-1] + 1) if ranges else 0, len(self.table))
            want_tclusters = max(tclusters, -(-want_entries * 8 // self.cs))
            if len(new_blocks) == len(blocks) and want_tclusters == tclusters:
                blocks = new_blocks
                break
            blocks, tclusters = new_blocks, want_tclusters
        if tclusters * self.cs > MAX_REFTABLE_BYTES:
            raise self.corrupt("Refcount table would exceed the maximum size")
        area = range(start, start + len(blocks) + tclusters)
        # Clusters of the area in ranges that already have a block: count them there first.
        for c in area:
            if self.block_offset(c // self.entries):
                await self.set(c, 1)
        await self.flush()
        new_table = self.table + [0] * (tclusters * self.cs // 8 - len(self.table))
        for i, r in enumerate(blocks):
            boff = (start + i) << self.cbits
            blk = bytearray(self.cs)
            for c in area:
                if c // self.entries == r:
                    self._write_entry(blk, c % self.entries, 1)
            await self.file.pwritev(boff, memoryview(blk))
            new_table[r] = boff
        toff = (start + len(blocks)) << self.cbits
        await self.file.pwritev(toff, memoryview(struct.pack(f">{len(new_table)}Q", *new_table)))
        await self.file.flush()
        self.h.refcount_table_offset, self.h.refcount_table_clusters = toff, tclusters
        await self.file.pwritev(48, memoryview(struct.pack(">QI", toff, tclusters)))
        await self.file.flush()
        self.table = new_table
        self.generation += 1
        self.free_hint = max(self.free_hint, area.stop)
        await self.update(old_off, old_clusters * self.cs, -1)
