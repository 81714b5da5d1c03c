"""The open image's metadata: header, L1 table, L2 cache, refcounts (shared by driver, check, snapshot, amend).

``Image`` knows nothing about guest requests; it answers "where does guest cluster N live" (``lookup``,
``l2_slot``) and updates metadata in the crash-safe order. Names here are a stable API:

* ``img.h`` (:class:`~.header.Header`), ``img.cs`` (cluster size), ``img.l1`` (list of L1 entries),
  ``img.l2_cache`` (:class:`~.cache.MetaCache`), ``img.rc`` (:class:`~.refcount.Refcounts`), ``img.file``,
  ``img.data`` (the child holding guest data: ``file`` or the external ``data-file``);
* ``await img.read_l2(l2_offset, i)`` -> the :class:`L2Slice` holding entry ``i`` of that table (the cache
  holds ``l2-cache-entry-size`` slices, as QEMU); ``l2_get(slice, i)`` -> (entry, bitmap) and
  ``l2_put(slice, i, entry, bitmap)`` take the index in the whole table; ``img.l2_slices(l2_offset)`` walks a
  table slice by slice; ``img.slice_end(c)`` is the first guest cluster after the slice mapping cluster ``c``;
  after changing a slice, ``img.l2_cache.mark_dirty(slice.off)`` before the next ``await``;
* ``await img.lookup(guest_offset)`` -> ``Mapping``; ``await img.write_header()``; ``await img.write_l1_entry(i)``;
* ``await img.flush_metadata()`` writes dirty refcount blocks and L2 tables in order.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NamedTuple

from blockgraph.errors import BlockIOError, ImageCorrupt, NotSupported

from .cache import MetaCache
from .constants import (
    INCOMPAT_DIRTY,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAX_HOST_OFFSET,
    MAX_L1_BYTES,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SUBCLUSTERS,
    ClusterType,
)
from .refcount import Refcounts

if TYPE_CHECKING:
    from blockgraph.node import Child

    from .header import Header

_Q = struct.Struct(">Q")
_QQ = struct.Struct(">QQ")
_SHARED = {ClusterType.NORMAL: ClusterType.NORMAL_SHARED, ClusterType.ZERO_ALLOC: ClusterType.ZERO_ALLOC_SHARED,
           ClusterType.UNALLOCATED_ALLOC: ClusterType.NORMAL_SHARED}
_HOSTED = (ClusterType.NORMAL, ClusterType.ZERO_ALLOC, ClusterType.NORMAL_SHARED, ClusterType.ZERO_ALLOC_SHARED,
           ClusterType.UNALLOCATED_ALLOC)


class Mapping(NamedTuple):
    """Where ``length`` guest bytes from a lookup's offset live: one type, contiguous host bytes.

    A NamedTuple, not an attrs class: one is built per lookup, per layer, per request (3x cheaper).
    """

    type: int
    host: int  # host byte offset of the first byte (NORMAL / ZERO_ALLOC), or the raw L2 entry (COMPRESSED)
    length: int


class L2Slice(bytearray):
    """Part of one L2 table as the cache holds it: ``off`` is its host offset, ``start`` its byte offset
    within the table (entry ``i`` of the table is at ``entry_size * i - start`` in the slice)."""

    __slots__ = ("off", "start")

    def __init__(self, size: int, off: int, start: int) -> None:
        super().__init__(size)
        self.off = off
        self.start = start

    @property
    def table_off(self) -> int:
        """Host offset of the whole L2 table this slice belongs to."""
        return self.off - self.start


class Image:
    def __init__(self, file: Child, header: Header, *, node_name: str = "", l2_cache_entries: int = 16,
                 l2_slice_size: int | None = None, refcount_cache_clusters: int = 4) -> None:
        self.file = file
        self.data: Child = file
        self.h = header
        self.node_name = node_name
        self.cs = header.cluster_size
        self.cbits = header.cluster_bits
        self.extl2 = header.extended_l2
        self.l2_entries = header.l2_entries
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.sc_size = self.cs // SUBCLUSTERS if self.extl2 else self.cs
        self.l1: list[int] = []
        self.esize = header.l2_entry_size  # bytes per L2 entry: 8, or 16 with extended L2
        self.slice_size = l2_slice_size or self.cs
        self.slice_entries = self.slice_size // self.esize
        self.l2_cache = MetaCache("l2", file, self.slice_size, l2_cache_entries,
                                  factory=lambda off, size: L2Slice(size, off, off & (self.cs - 1)))
        self.rc = Refcounts(file, header, refcount_cache_clusters, node_name)
        self.rc.overlap_check = self.overlaps_metadata
        self.rc.before_new_block = self.l2_cache.flush
        self.has_data_file = False
        self.lazy = header.lazy_refcounts
        self.dirty_set = header.dirty
        self.compressed_mask = (1 << (62 - (self.cbits - 8))) - 1
        self.l1_generation = 0  # bumped whenever an L1 entry is written (overlap check cache)
        self._rb_key: tuple[int, int] | None = None
        self._l2_key: tuple[int, int] | None = None
        self._rb_set: frozenset[int] = frozenset()
        self._l2_set: frozenset[int] = frozenset()

    def corrupt(self, what: str, offset: int | None = None) -> ImageCorrupt:
        return ImageCorrupt(what, node=self.node_name or None, offset=offset)

    # ------------------------------------------------------------ loading

    async def load(self, file_length: int) -> None:
        h = self.h
        if h.l1_size * 8 > MAX_L1_BYTES:
            raise self.corrupt("Active L1 table too large")
        vsize_clusters = -(-h.size // self.cs)
        need = -(-vsize_clusters // self.l2_entries)
        if h.l1_size < need:
            raise self.corrupt("L1 table is too small")
        if h.l1_size and (h.l1_table_offset % self.cs or h.l1_table_offset + h.l1_size * 8 > file_length):
            raise self.corrupt("Invalid L1 table offset", h.l1_table_offset)
        if h.size >= MAX_HOST_OFFSET:
            raise self.corrupt(f"Image size {h.size} is too large")
        buf = bytearray(h.l1_size * 8)
        if buf:
            await self.file.preadv(h.l1_table_offset, memoryview(buf))
        self.l1 = list(struct.unpack(f">{h.l1_size}Q", buf))
        await self.rc.load()

    # ------------------------------------------------------------ L2 access

    def l2_offset(self, l1_index: int) -> int:
        if l1_index >= len(self.l1):
            return 0
        off = self.l1[l1_index] & L1E_OFFSET_MASK
        if off and off % self.cs:
            raise self.corrupt(f"L2 table offset {off:#x} unaligned (L1 index: {l1_index:#x})")
        return off

    async def read_l2(self, l2_off: int, i: int) -> L2Slice:
        """The cached slice holding entry ``i`` of the L2 table at host ``l2_off``."""
        off = l2_off + (i * self.esize & -self.slice_size)
        t = self.l2_cache.peek(off)
        if t is not None:
            return t  # type: ignore[return-value]
        if l2_off >= self.file.getlength() or l2_off < self.cs:
            raise self.corrupt(f"L2 table offset {l2_off:#x} out of range (file length {self.file.getlength()})",
                               l2_off)
        return await self.l2_cache.get(off)  # type: ignore[return-value]

    async def l2_slices(self, l2_off: int) -> AsyncIterator[L2Slice]:
        """Every slice of the L2 table at ``l2_off`` in order; entries ``range(*img.slice_range(slice))``."""
        for i in range(0, self.l2_entries, self.slice_entries):
            yield await self.read_l2(l2_off, i)

    def slice_range(self, t: L2Slice) -> range:
        """The table indexes of the entries in slice ``t``."""
        first = t.start // self.esize
        return range(first, first + self.slice_entries)

    def slice_end(self, c: int) -> int:
        """The first guest cluster after the L2 slice that maps guest cluster ``c``."""
        return (c // self.slice_entries + 1) * self.slice_entries

    def overlaps_metadata(self, host: int, length: int) -> str | None:
        """Which metadata structure a data write to ``[host, host+length)`` would hit (QEMU's overlap check
        for the cheap structures: header, active L1, refcount table, refcount blocks, active L2 tables)."""
        cs = self.cs
        end = host + length

        def hit(start: int, size: int) -> bool:
            return start < end and host < start + size

        h = self.h
        if hit(0, cs):
            return "qcow2_header"
        if h.l1_size and hit(h.l1_table_offset, h.l1_size * 8):
            return "active L1 table"
        if hit(h.refcount_table_offset, h.refcount_table_clusters * cs):
            return "refcount table"
        first, last = host // cs, (end - 1) // cs
        refblocks, l2s = self._refblocks(), self._l2_tables()
        for c in range(first, last + 1):
            off = c * cs
            if off in refblocks:
                return "refcount block"
            if off in l2s:
                return "active L2 table"
        return None

    def _refblocks(self) -> frozenset[int]:
        key = (id(self.rc.table), self.rc.generation)
        if self._rb_key != key:
            self._rb_set = frozenset(e & 0xFFFFFFFFFFFFFE00 for e in self.rc.table if e)
            self._rb_key = key
        return self._rb_set

    def _l2_tables(self) -> frozenset[int]:
        key = (id(self.l1), self.l1_generation)
        if self._l2_key != key:
            self._l2_set = frozenset(e & L1E_OFFSET_MASK for e in self.l1 if e & L1E_OFFSET_MASK)
            self._l2_key = key
        return self._l2_set

    def l2_get(self, t: L2Slice, i: int) -> tuple[int, int]:
        """(entry, bitmap) of entry ``i`` of the table, which must lie in slice ``t``."""
        pos = self.esize * i - t.start
        if pos < 0:  # struct would count a negative offset from the end: a caller passed the wrong slice
            raise IndexError(f"L2 entry {i} is not in the slice at {t.off:#x}")
        if self.extl2:
            return _QQ.unpack_from(t, pos)
        return _Q.unpack_from(t, pos)[0], 0

    def l2_put(self, t: L2Slice, i: int, entry: int, bitmap: int = 0) -> None:
        pos = self.esize * i - t.start
        if pos < 0:
            raise IndexError(f"L2 entry {i} is not in the slice at {t.off:#x}")
        if self.extl2:
            _QQ.pack_into(t, pos, entry, bitmap)
        else:
            _Q.pack_into(t, pos, entry)

    def discard_l2(self, l2_off: int) -> None:
        """Forget every cached slice of the L2 table at ``l2_off`` (freed, or rewritten behind the cache)."""
        self.l2_cache.discard(l2_off, self.cs)

    async def entry_at(self, guest_offset: int) -> tuple[int, int]:
        """The raw (entry, bitmap) of the guest cluster containing ``guest_offset`` ((0, 0) if no L2 table)."""
        ci = guest_offset >> self.cbits
        l2_off = self.l2_offset(ci >> self.l2_bits)
        if not l2_off:
            return 0, 0
        i = ci & (self.l2_entries - 1)
        return self.l2_get(await self.read_l2(l2_off, i), i)

    def classify(self, entry: int, bitmap: int, sc: int) -> tuple[int, int]:
        """(ClusterType, host cluster offset) of subcluster ``sc`` (0 without extended L2) of an L2 entry."""
        if entry & OFLAG_COMPRESSED:
            return ClusterType.COMPRESSED, entry
        off = entry & L2E_OFFSET_MASK
        if off % self.cs:
            raise self.corrupt(f"Cluster allocation offset {off:#x} unaligned (L2 entry {entry:#x})")
        if self.extl2:
            if bitmap >> sc & 1 and bitmap >> (32 + sc) & 1:
                raise self.corrupt(f"Invalid subcluster bitmap {bitmap:#x}: subcluster {sc} both allocated and zero")
            if bitmap >> (32 + sc) & 1:
                return (ClusterType.ZERO_ALLOC if off else ClusterType.ZERO_PLAIN), off
            if bitmap >> sc & 1:
                if not off and not (self.has_data_file and entry & OFLAG_COPIED):
                    raise self.corrupt(f"Subcluster allocated without a host offset (L2 entry {entry:#x})")
                return ClusterType.NORMAL, off
            return (ClusterType.UNALLOCATED_ALLOC if off else ClusterType.UNALLOCATED), off
        if entry & OFLAG_ZERO and self.h.version >= 3:
            return (ClusterType.ZERO_ALLOC if off else ClusterType.ZERO_PLAIN), off
        if off or (self.has_data_file and entry & OFLAG_COPIED):
            return ClusterType.NORMAL, off
        return ClusterType.UNALLOCATED, 0

    async def lookup(self, offset: int, length: int, for_write: bool = False) -> Mapping:
        """The mapping of ``[offset, offset+length)`` up to the first change of type or host contiguity.

        ``for_write`` tells shared clusters apart (NORMAL_SHARED / ZERO_ALLOC_SHARED: no COPIED flag).
        """
        sc_size = self.sc_size
        ci = offset >> self.cbits
        l1i = ci >> self.l2_bits
        l2_off = self.l2_offset(l1i)
        in_cluster = offset & (self.cs - 1)
        if not l2_off:
            # No L2 table: unallocated up to the end of what this L1 entry covers.
            span = ((l1i + 1) << (self.l2_bits + self.cbits)) - offset
            return Mapping(ClusterType.UNALLOCATED, 0, min(length, span))
        i = ci & (self.l2_entries - 1)
        table = await self.read_l2(l2_off, i)
        last = i | (self.slice_entries - 1)  # the run ends with the slice
        entry, bitmap = self.l2_get(table, i)
        sc = in_cluster // sc_size if self.extl2 else 0
        typ, host = self.classify(entry, bitmap, sc)
        if for_write and not entry & OFLAG_COPIED:
            typ = _SHARED.get(typ, typ)
        if typ == ClusterType.COMPRESSED:
            if self.has_data_file:
                raise self.corrupt(f"Compressed cluster entry found in image with external data file "
                                   f"(L2 offset: {l2_off:#x}, L2 index: {i:#x})")
            return Mapping(typ, entry, min(length, self.cs - in_cluster))
        start_host = host + in_cluster
        self._check_host(typ, host, entry)
        if self.has_data_file and typ in _HOSTED and host != ci << self.cbits:
            raise self.corrupt(f"External data file host cluster offset {host:#x} does not match guest cluster "
                               f"offset: {ci << self.cbits:#x}")
        got = (sc + 1) * sc_size - in_cluster if self.extl2 else self.cs - in_cluster
        # Extend over following subclusters / clusters of the same table with the same type and contiguity.
        while got < length:
            pos_c = (in_cluster + got) >> self.cbits  # clusters after the first
            if self.extl2 and (in_cluster + got) & (self.cs - 1):
                nsc = ((in_cluster + got) & (self.cs - 1)) // sc_size
                t2, h2 = self.classify(entry, bitmap, nsc)
            else:
                if i + pos_c > last:
                    break
                entry, bitmap = self.l2_get(table, i + pos_c)
                t2, h2 = self.classify(entry, bitmap, 0)
                if t2 == ClusterType.COMPRESSED:
                    break
                if for_write and not entry & OFLAG_COPIED:
                    t2 = _SHARED.get(t2, t2)
                self._check_host(t2, h2, entry)
            if t2 != typ:
                break
            if h2 != host + (pos_c << self.cbits) and typ in _HOSTED:
                break
            got += sc_size if self.extl2 else self.cs
        return Mapping(typ, start_host, min(length, got))

    def _check_host(self, typ: int, host: int, entry: int) -> None:
        if typ == ClusterType.NORMAL and host >= MAX_HOST_OFFSET:
            raise self.corrupt(f"Data cluster offset {host:#x} out of range (L2 entry {entry:#x})")

    def compressed_range(self, entry: int) -> tuple[int, int]:
        """(host byte offset, byte count to read) of a compressed cluster descriptor."""
        x = 62 - (self.cbits - 8)
        off = entry & ((1 << x) - 1)
        nsectors = ((entry & ~OFLAG_COMPRESSED & ~OFLAG_COPIED) >> x) + 1
        return off, nsectors * 512 - (off & 511)

    # ------------------------------------------------------------ writing metadata

    async def write_header(self) -> None:
        """Rewrite cluster 0's header, extensions and backing name (one write)."""
        await self.file.pwritev(0, memoryview(self.h.pack()))

    async def write_header_fields(self) -> None:
        """Rewrite only the fixed header fields QEMU updates in place (size, L1, refcount table, snapshots)."""
        await self.file.pwritev(0, memoryview(self.h.pack()[:72]))

    async def write_l1_entry(self, i: int) -> None:
        """Write the aligned 512-byte L1 sector holding entry ``i`` (as QEMU's qcow2_write_l1_entry)."""
        self.l1_generation += 1
        first = i - i % 64
        n = min(64, len(self.l1) - first)
        buf = struct.pack(f">{n}Q", *self.l1[first:first + n])
        await self.file.pwritev(self.h.l1_table_offset + 8 * first, memoryview(buf))

    async def write_l1(self) -> None:
        self.l1_generation += 1
        buf = struct.pack(f">{len(self.l1)}Q", *self.l1)
        if buf:
            await self.file.pwritev(self.h.l1_table_offset, memoryview(buf))

    async def set_dirty(self) -> None:
        """Lazy refcounts: mark the image dirty before the first metadata update that skips refcount writes."""
        if self.dirty_set:
            return
        self.h.incompatible_features |= INCOMPAT_DIRTY
        await self.file.flush()
        await self.file.pwritev(72, memoryview(struct.pack(">Q", self.h.incompatible_features)))
        await self.file.flush()
        self.dirty_set = True

    async def clear_dirty(self) -> None:
        if not self.dirty_set:
            return
        await self.flush_metadata()
        await self.file.flush()
        self.h.incompatible_features &= ~INCOMPAT_DIRTY
        await self.file.pwritev(72, memoryview(struct.pack(">Q", self.h.incompatible_features)))
        await self.file.flush()
        self.dirty_set = False

    async def discard_free(self, clusters: set[int]) -> None:
        """Discard the clusters of ``clusters`` that are still free, in runs, once the metadata that stopped
        referencing them is on disk (a discard error only leaves the space allocated in the file)."""
        if not clusters:
            return
        await self.flush_metadata()
        await self.file.flush()
        free = [c for c in sorted(clusters) if await self.rc.get(c) == 0]  # not allocated again meanwhile
        i = 0
        while i < len(free):
            j = i
            while j + 1 < len(free) and free[j + 1] == free[j] + 1:
                j += 1
            try:
                await self.file.pdiscard(free[i] << self.cbits, (j - i + 1) << self.cbits)
            except (BlockIOError, NotSupported):
                pass
            i = j + 1

    async def flush_metadata(self) -> None:
        """Dirty refcount blocks, then dirty L2 tables (their cache's dependencies decide the flushes)."""
        await self.rc.flush()
        await self.l2_cache.flush()
        await self.rc.flush()
