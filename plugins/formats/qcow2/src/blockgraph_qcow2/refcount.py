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

import contextlib
import struct
from collections.abc import Awaitable, Callable, Iterator
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
        self.before_new_block: Callable[[], Awaitable[None]] | None = None  # set by Image: write L2 tables first
        self.node_name = node_name
        self.write_header_fields = write_header_fields  # async callback(h) persisting refcount table fields
        self.freed: set[int] | None = None  # while collecting: clusters whose refcount dropped to 0

    @contextlib.contextmanager
    def collecting_freed(self) -> Iterator[set[int]]:
        """The clusters whose refcount drops to 0 inside the block (an enclosing block gets them too)."""
        outer = self.freed
        mine: set[int] = set()
        self.freed = mine
        try:
            yield mine
        finally:
            self.freed = outer
            if outer is not None:
                outer |= mine

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
        """Set one refcount (its block is created first when missing)."""
        while not self.block_offset(cluster // self.entries):
            try:
                await self._alloc_block(cluster)
            except _Again:
                pass
        off = self.block_offset(cluster // self.entries)
        blk = await self.cache.get(off)
        self._write_entry(blk, cluster % self.entries, value)
        self.cache.mark_dirty(off)

    async def update(self, offset: int, length: int, addend: int) -> None:
        """Add ``addend`` to the refcount of every cluster overlapping ``[offset, offset+length)``."""
        while True:
            try:
                await self._update(offset, length, addend)
                return
            except _Again:
                continue  # a refcount block was created on the way: run again (QEMU's -EAGAIN)

    async def _update(self, offset: int, length: int, addend: int) -> None:
        """QEMU's update_refcount: raises _Again after creating a refcount block, undoing what it had done."""
        if length <= 0:
            return
        first, last = offset >> self.cbits, (offset + length - 1) >> self.cbits
        done = first
        try:
            for c in range(first, last + 1):
                off = self.block_offset(c // self.entries)
                if not off:
                    if addend < 0:
                        raise self.corrupt(f"refcount of cluster {c} would become {addend} (out of range)",
                                           c << self.cbits)
                    try:
                        await self._alloc_block(c)
                    except _Again:
                        self.free_hint = min(self.free_hint, first)  # search again from here, as QEMU
                        raise
                blk = await self.cache.get(off)
                i = c % self.entries
                v = self._read_entry(blk, i) + addend
                if v < 0 or v > self.max_refcount:
                    raise self.corrupt(f"refcount of cluster {c} would become {v} (out of range)", c << self.cbits)
                self._write_entry(blk, i, v)
                self.cache.mark_dirty(off)
                if v == 0:
                    self.free_hint = min(self.free_hint, c)
                    if self.freed is not None:
                        self.freed.add(c)
                done = c + 1
        except BaseException:
            if done > first:
                await self._update(first << self.cbits, (done - first) << self.cbits, -addend)
            raise

    async def flush(self) -> None:
        await self.cache.flush()

    # ------------------------------------------------------------ allocation

    async def alloc_clusters(self, n: int) -> int:
        """Find ``n`` contiguous free clusters, set their refcounts to 1, return the host offset
        (QEMU's qcow2_alloc_clusters: search, count, and search again if a refcount block had to be made)."""
        while True:
            start = await self._alloc_noref(n)
            if all(self.block_offset(r) for r in range(start // self.entries, (start + n - 1) // self.entries + 1)):
                await self.set_range(start, n, 1)  # the common case at C speed: every count was 0
                break
            try:
                await self._update(start << self.cbits, n << self.cbits, 1)
                break
            except _Again:
                continue
        return start << self.cbits

    async def find_free_covered(self, n: int) -> int:
        """The first cluster of ``n`` free contiguous ones (refcounts untouched), as the next allocation would."""
        start = await self._find_free(n)
        self._check_overlap(start << self.cbits, n << self.cbits, "allocation")
        return start

    async def _alloc_noref(self, n: int) -> int:
        """QEMU's alloc_clusters_noref: the first free run from ``free_hint``; ``free_hint`` moves past it."""
        start = await self._find_free(n)
        if (start + n) << self.cbits > MAX_HOST_OFFSET:
            raise self.corrupt("Cannot allocate clusters past the supported host offset range")
        self._check_overlap(start << self.cbits, n << self.cbits, "allocation")
        self.free_hint = start + n
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
        while True:
            off = self.free_byte_offset
            if off and await self.get(off >> self.cbits) >= self.max_refcount:
                off = 0  # the partly used cluster cannot take another reference
            if not off or (off % cs) + size > cs:
                start = await self._alloc_noref(-(-size // cs))
                if not off or -(-off // cs) != start:
                    off = start << self.cbits
            try:
                await self._update(off, size, 1)
                break
            except _Again:
                continue
        end = off + size
        self.free_byte_offset = end if end % cs else 0
        return off

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

    def metadata_clusters(self, clusters: int, generous: bool = False) -> tuple[int, int]:
        """(refcount blocks, table clusters) that count ``clusters`` plus themselves (the fixed point QEMU's
        qcow2_refcount_metadata_size finds); ``generous`` leaves room to grow by half the table."""
        per_table_cluster = self.cs // 8
        table = blocks = n = 0
        while True:
            last = n
            blocks = -(-(clusters + table + blocks) // self.entries)
            table = -(-blocks // per_table_cluster)
            n = clusters + blocks + table
            if n == last and generous:
                clusters += -(-table // 2)
                n, generous = 0, False
                continue
            if n == last:
                return blocks, table

    async def refcount_area(self, start: int, additional: int, exact: bool = True, new_index: int = -1,
                            new_block: int = 0) -> int:
        """A new refcount table (and the blocks it lacks) at free cluster ``start``, sized for ``start +
        additional`` clusters (half as much again unless ``exact``), optionally hooking up refcount block
        ``new_block`` at ``new_index``; returns the first cluster after it (QEMU's qcow2_refcount_area)."""
        total_blocks, _ = self.metadata_clusters(start + additional, generous=not exact)
        per = self.cs // 8
        table_size = total_blocks if exact else total_blocks + -(-total_blocks // 2)
        table_size = -(-table_size // per) * per
        table_clusters = table_size * 8 // self.cs
        if table_size * 8 > MAX_REFTABLE_BYTES:
            raise self.corrupt("Refcount table would exceed the maximum size")
        used = max((i + 1 for i, e in enumerate(self.table) if e), default=1)
        new_table = (self.table[:min(used, table_size)] + [0] * table_size)[:table_size]
        if new_block:
            new_table[new_index] = new_block
        area_index = start // self.entries
        missing = sum(1 for i in range(area_index, total_blocks) if not new_table[i])
        table_at = start + missing
        end = table_at + table_clusters
        block_at = start
        for i in range(area_index, total_blocks):
            if new_table[i]:
                off = new_table[i] & REFT_OFFSET_MASK
                blk = await self.cache.get(off)
            else:
                off = block_at << self.cbits
                blk = await self.cache.new(off)
                new_table[i] = off
                block_at += 1
            first = i * self.entries
            if first < end:
                for j in range(max(start - first, 0), min(end - first, self.entries)):
                    self._write_entry(blk, j, 1)
                self.cache.mark_dirty(off)
        await self.cache.flush()
        await self.file.flush()
        await self.file.pwritev(table_at << self.cbits, memoryview(struct.pack(f">{table_size}Q", *new_table)))
        await self.file.flush()
        await self.file.pwritev(48, memoryview(struct.pack(">QI", table_at << self.cbits, table_clusters)))
        await self.file.flush()
        old_off, old_clusters = self.h.refcount_table_offset, self.h.refcount_table_clusters
        self.h.refcount_table_offset, self.h.refcount_table_clusters = table_at << self.cbits, table_clusters
        self.table = new_table
        self.generation += 1
        await self.update(old_off, old_clusters * self.cs, -1)
        return end

    async def alloc_clusters_at(self, start: int, n: int) -> None:
        """Take clusters [start, start+n), which must be free and counted by existing blocks."""
        for c in range(start, start + n):
            if await self.get(c):
                raise self.corrupt(f"cluster {c} is already in use", c << self.cbits)
        await self.set_range(start, n, 1)

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

    async def _alloc_block(self, cluster: int) -> None:
        """Create the refcount block counting ``cluster`` and raise _Again (QEMU's alloc_refcount_block).

        The block goes to the first free cluster; it counts itself when it lies in its own range, else its
        refcount is set where it lies. A full table moves to the start of the next uncovered range."""
        r = cluster // self.entries
        if self.before_new_block is not None:
            await self.before_new_block()
        nb = await self._alloc_noref(1)
        if nb == 0:
            raise self.corrupt("Preventing invalid allocation of refcount block at offset 0", 0)
        blk = bytearray(self.cs)
        if nb // self.entries == r:
            self._write_entry(blk, nb % self.entries, 1)
        else:
            await self.update(nb << self.cbits, self.cs, 1)
            await self.cache.flush()
        self._check_overlap(nb << self.cbits, self.cs, "refcount block allocation")
        await self.cache.new(nb << self.cbits, bytes(blk))
        await self.cache.flush()
        await self.file.flush()
        if r < len(self.table):
            entry = memoryview(struct.pack(">Q", nb << self.cbits))
            await self.file.pwritev(self.h.refcount_table_offset + 8 * r, entry)
            await self.file.flush()
            self.table[r] = nb << self.cbits
            self.generation += 1
            raise _Again
        blocks_used = -(-max(cluster + 1, nb + 1) // self.entries)
        await self.refcount_area(blocks_used * self.entries, 0, exact=False, new_index=r, new_block=nb << self.cbits)
        raise _Again


class _Again(Exception):
    """A refcount block was created: the caller looks for free clusters again (QEMU's -EAGAIN)."""
