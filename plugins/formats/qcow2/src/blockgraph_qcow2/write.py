"""Writes: cluster allocation with copy-on-write, zero clusters, discard (QEMU's qcow2-cluster.c).

Crash-safe order, as QEMU: new clusters get their refcounts first (the L2 cache depends on the refcount
cache, so refcount blocks reach the file and are flushed before any L2 table pointing at them); guest data
and copied head/tail are written before the L2 entry (the L2 cache needs a file flush before it is written);
freeing updates the L2 entry on disk first, then the refcounts. With lazy refcounts the image is marked
dirty instead of ordering refcount writes.

Concurrency: non-allocating writes to clusters we own (COPIED) go straight to the data file; allocating
writes reserve their guest clusters (``self.inflight``), allocate under ``meta_lock``, write data without it,
and take it again to link the L2 entries. Reads never take the lock.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

from blockgraph.driver import ReqFlags
from blockgraph.errors import BlockIOError, ImageCorrupt, NotSupported

from .constants import (
    INCOMPAT_CORRUPT,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SUBCLUSTERS,
    ClusterType,
)
from .image import L2Slice

CT = ClusterType
_ALL_ALLOC = (1 << SUBCLUSTERS) - 1
_ALL_ZERO = _ALL_ALLOC << SUBCLUSTERS
_REUSABLE = (CT.ZERO_ALLOC, CT.UNALLOCATED_ALLOC)
_COMPRESSED = int(ReqFlags.WRITE_COMPRESSED)  # host cluster is ours, only the L2 entry changes


class WriteMixin:
    img: Any
    file: Any
    data: Any
    node: Any
    backing: Any
    cluster_size: int

    def _init_write_state(self) -> None:
        self.meta_lock = asyncio.Lock()
        self.inflight: dict[int, asyncio.Future] = {}

    # ------------------------------------------------------------ helpers

    async def _meta_changing(self) -> None:
        """Before a metadata update: lazy refcounts mark the image dirty; otherwise order L2 after refcounts."""
        img = self.img
        if img.lazy:
            await img.set_dirty()
        else:
            img.l2_cache.set_dependency(img.rc.cache)

    async def _get_l2_for_write(self, c: int) -> tuple[int, L2Slice]:
        """(table offset, slice) of the L2 entry mapping guest cluster ``c``, its table allocated or copied (if
        shared) first. Under meta_lock."""
        img = self.img
        l1i = c >> img.l2_bits
        i = c & (img.l2_entries - 1)
        if l1i >= len(img.l1):
            raise BlockIOError(errno.EIO, node=self.node.node_name, op="write",
                               detail=f"L1 index {l1i} beyond the L1 table ({len(img.l1)} entries)")
        old = img.l1[l1i]
        off = old & L1E_OFFSET_MASK
        if off and old & OFLAG_COPIED:
            return off, await img.read_l2(img.l2_offset(l1i), i)
        await self._meta_changing()
        src = img.l2_offset(l1i)  # the shared table to copy (checked), or 0
        new = await img.rc.alloc_clusters(1)
        for first in range(0, img.l2_entries, img.slice_entries):
            content = bytes(await img.read_l2(src, first)) if src else None
            await img.l2_cache.new(new + first * img.esize, content)
        # The new table (after the refcounts that count it) reaches the disk before the L1 entry points at it.
        await img.l2_cache.flush()
        await self.file.flush()
        img.l1[l1i] = new | OFLAG_COPIED
        await img.write_l1_entry(l1i)
        if off:
            await self.file.flush()
            await img.rc.update(off, self.cluster_size, -1)
        return new, await img.read_l2(new, i)

    async def _reserve(self, c0: int, c1: int) -> bool:
        """Reserve guest clusters [c0, c1) for an allocating write; False (after waiting) if one was busy."""
        busy = [self.inflight[c] for c in range(c0, c1) if c in self.inflight]
        if busy:
            await asyncio.gather(*[asyncio.shield(f) for f in busy], return_exceptions=True)
            return False
        fut = asyncio.get_running_loop().create_future()
        for c in range(c0, c1):
            self.inflight[c] = fut
        return True

    def _release(self, c0: int, c1: int) -> None:
        fut = self.inflight.get(c0)
        for c in range(c0, c1):
            self.inflight.pop(c, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _free_host(self, entry: int, typ: int, *, discard: bool) -> None:
        """Drop this L2 entry's reference to its host cluster(s). The L2 change must be on disk already.

        A refcount that cannot drop (already 0) is reported and the cluster leaked, as qcow2_free_clusters."""
        try:
            await self._free_host_inner(entry, typ, discard=discard)
        except ImageCorrupt as e:
            import sys

            print(f"qcow2_free_clusters failed: {e.what}", file=sys.stderr)

    async def _free_host_inner(self, entry: int, typ: int, *, discard: bool) -> None:
        img = self.img
        if typ == CT.COMPRESSED:
            off, n = img.compressed_range(entry)
            await img.rc.update(off & ~511, n + (off & 511), -1)
            return
        host = entry & L2E_OFFSET_MASK
        if not host or img.has_data_file:
            if img.has_data_file and discard and host:
                await try_discard(self.data, host, self.cluster_size)
            return
        await img.rc.update(host, self.cluster_size, -1)
        if discard and await img.rc.get(host >> img.cbits) == 0:
            await try_discard(self.file, host, self.cluster_size)

    async def _check_overlap(self, host: int, length: int) -> None:
        """Refuse a data write onto metadata and mark the image corrupt, as QEMU's overlap check does."""
        img = self.img
        if img.has_data_file:
            return
        what = img.overlaps_metadata(host, length)
        if what is None:
            return
        if not img.h.incompatible_features & INCOMPAT_CORRUPT:
            import struct
            import sys

            print(f"qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with {what}); "
                  "further corruption events will be suppressed", file=sys.stderr)
            img.h.incompatible_features |= INCOMPAT_CORRUPT
            try:
                await self.file.pwritev(72, memoryview(struct.pack(">Q", img.h.incompatible_features)))
                await self.file.flush()
            except BlockIOError:
                pass
        raise BlockIOError(errno.EIO, node=self.node.node_name, op="write", offset=host, length=length,
                           detail=f"Preventing invalid write on metadata (overlaps with {what})")

    # ------------------------------------------------------------ pwritev

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        img = self.img
        if flags and flags & _COMPRESSED:  # `flags and`: IntFlag operations cost about 1 us each
            for pos in range(0, len(buf), self.cluster_size):
                await self._write_compressed(offset + pos, buf[pos:pos + self.cluster_size])
            return
        n = len(buf)
        pos = 0
        while pos < n:
            m = await img.lookup(offset + pos, n - pos, for_write=True)
            if m.type == CT.NORMAL:
                await self._check_overlap(m.host, m.length)
                await self.data.pwritev(m.host, buf[pos:pos + m.length])
                pos += m.length
                continue
            done = await self._alloc_write(offset + pos, buf[pos:pos + m.length], m.type)
            pos += done

    async def _alloc_write(self, start: int, data: memoryview, typ: int) -> int:
        """Write ``data`` at guest ``start`` into newly allocated (or reused) host clusters; returns bytes done
        (0 when it had to wait for another allocating write and the caller must look up again)."""
        img = self.img
        _cs, cbits = self.cluster_size, img.cbits
        end = start + len(data)
        c0, c1 = start >> cbits, ((end - 1) >> cbits) + 1
        c1 = min(c1, img.slice_end(c0))  # one L2 slice at a time
        end = min(end, c1 << cbits)
        if typ in _REUSABLE or (img.extl2 and typ in (CT.UNALLOCATED, CT.ZERO_PLAIN)) or typ == CT.COMPRESSED:
            c1 = c0 + 1  # these work cluster by cluster (reuse, bitmaps, per-cluster descriptors)
            end = min(end, c1 << cbits)
        if not await self._reserve(c0, c1):
            return 0
        try:
            return await self._alloc_write_reserved(start, end, data[:end - start], typ, c0, c1)
        finally:
            self._release(c0, c1)

    async def _alloc_write_reserved(self, start: int, end: int, data: memoryview, typ: int, c0: int,
                                    c1: int) -> int:
        img = self.img
        cs, cbits = self.cluster_size, img.cbits
        # Re-check under the reservation: another writer may have finished this cluster meanwhile.
        m = await img.lookup(start, end - start, for_write=True)
        if m.type != typ or m.length < end - start:
            return 0
        i0 = c0 & (img.l2_entries - 1)
        async with self.meta_lock:
            _, table = await self._get_l2_for_write(c0)
            old = [img.l2_get(table, i0 + k) for k in range(c1 - c0)]
            reuse = typ in _REUSABLE
            if img.has_data_file:
                host = c0 << cbits  # external data file: guest offset = host offset, nothing to refcount
            elif reuse:
                host = old[0][0] & L2E_OFFSET_MASK
            else:
                await self._meta_changing()
                host = await img.rc.alloc_clusters(c1 - c0)
        # Copy-on-write granularity: the whole cluster, or the subcluster with extended L2 (unless the old
        # content lives in a shared or compressed cluster: then the whole cluster is copied).
        gran = img.sc_size if img.extl2 and typ not in (CT.NORMAL_SHARED, CT.COMPRESSED,
                                                        CT.ZERO_ALLOC_SHARED) else cs
        cow_start = start - start % gran
        cow_end = min(-(-end // gran) * gran, c1 << cbits)
        base = c0 << cbits
        await self._check_overlap(host + cow_start - base, cow_end - cow_start)
        if cow_start < start:
            head = bytearray(start - cow_start)
            await self.preadv(cow_start, memoryview(head), ReqFlags.NONE)
            await self.data.pwritev(host + cow_start - base, memoryview(head))
        await self.data.pwritev(host + start - base, data)
        if end < cow_end:
            tail = bytearray(cow_end - end)
            await self.preadv(end, memoryview(tail), ReqFlags.NONE)
            await self.data.pwritev(host + end - base, memoryview(tail))
        async with self.meta_lock:
            await self._meta_changing()
            _, table = await self._get_l2_for_write(c0)
            for k in range(c1 - c0):
                entry_host = host + (k << cbits)
                if img.extl2:
                    if gran == cs:
                        bitmap = _ALL_ALLOC
                    else:
                        bits = 0
                        lo = max(cow_start, (c0 + k) << cbits)
                        hi = min(cow_end, (c0 + k + 1) << cbits)
                        for sc in range((lo & (cs - 1)) // gran, ((hi - 1) & (cs - 1)) // gran + 1):
                            bits |= 1 << sc
                        bitmap = (old[k][1] | bits) & ~(bits << SUBCLUSTERS)
                    img.l2_put(table, i0 + k, entry_host | OFLAG_COPIED, bitmap)
                else:
                    img.l2_put(table, i0 + k, entry_host | OFLAG_COPIED)
            img.l2_cache.mark_dirty(table.off)
            img.l2_cache.needs_flush = True
            if typ in (CT.NORMAL_SHARED, CT.COMPRESSED, CT.ZERO_ALLOC_SHARED):
                await img.l2_cache.flush()
                await self.file.flush()
                for entry, _ in old:
                    await self._free_host(entry, typ, discard=self._discard_snapshot)
        return end - start

    async def _write_compressed(self, offset: int, data: memoryview) -> None:
        """One cluster (or the image's partial last one) stored compressed (qcow2_co_pwritev_compressed)."""
        img = self.img
        cs = self.cluster_size
        if img.has_data_file:
            raise BlockIOError(errno.ENOTSUP, node=self.node.node_name, op="write", offset=offset,
                               detail="Compression is not supported with an external data file")
        if offset % cs or (len(data) != cs and offset + len(data) < img.h.size):
            # Whole clusters only; qemu-io shows just "Invalid argument", so no detail here.
            raise BlockIOError(errno.EINVAL, node=self.node.node_name, op="write", offset=offset,
                               length=len(data))
        plain = bytes(data) if len(data) == cs else bytes(data) + bytes(cs - len(data))
        from .compress import compress

        # In the blocking pool: zlib and zstd release the GIL, so clusters compress in parallel (as QEMU's pool).
        packed = await self.node.run_blocking(compress, img.h.compression_type, plain)
        if len(packed) > cs - 1:  # no gain: QEMU writes a normal cluster
            await self.pwritev(offset, memoryview(plain)[:len(data)], ReqFlags.NONE)
            return
        c = offset >> img.cbits
        while not await self._reserve(c, c + 1):
            pass
        try:
            async with self.meta_lock:
                await self._meta_changing()
                _, table = await self._get_l2_for_write(c)
                i = c & (img.l2_entries - 1)
                entry, _ = img.l2_get(table, i)
                if entry & (L2E_OFFSET_MASK | OFLAG_COMPRESSED):
                    raise BlockIOError(errno.EIO, node=self.node.node_name, op="write", offset=offset,
                                       detail="Compression can't overwrite an allocated cluster")
                host = await img.rc.alloc_bytes(len(packed))
            await self._check_overlap(host, len(packed))
            await self.file.pwritev(host, memoryview(packed))
            x = 62 - (img.cbits - 8)
            nsectors = ((host + len(packed) - 1) >> 9) - (host >> 9)
            async with self.meta_lock:
                _, table = await self._get_l2_for_write(c)
                img.l2_put(table, i, OFLAG_COMPRESSED | (nsectors << x) | host, 0)
                img.l2_cache.mark_dirty(table.off)
                img.l2_cache.needs_flush = True
        finally:
            self._release(c, c + 1)

    @property
    def _discard_snapshot(self) -> bool:
        return self.options.pass_discard_snapshot  # type: ignore[attr-defined]

    # ------------------------------------------------------------ zeroes and discard

    async def pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        img = self.img
        v2 = img.h.version < 3
        if v2 and self.backing is not None:
            raise NotSupported("qcow2 v2 has no zero clusters")  # without a backing file, v2 unmaps instead
        gran = img.sc_size
        end = offset + length
        unmap = bool(flags & ReqFlags.MAY_UNMAP) or v2
        lo, hi = -(-offset // gran) * gran, end // gran * gran
        if hi < lo:  # inside one (sub)cluster
            await self._zero_edge(lo - gran, lo, offset, end, unmap, v2)
            return
        if lo > offset:
            await self._zero_edge(lo - gran, lo, offset, lo, unmap, v2)
        if hi > lo:
            await self._zero_range(lo, hi, unmap=unmap, discard_type="request", from_discard=v2)
        if end > hi:
            await self._zero_edge(hi, min(hi + gran, -(-img.h.size // gran) * gran), hi, end, unmap, v2)

    async def _zero_edge(self, sub_lo: int, sub_hi: int, lo: int, hi: int, unmap: bool, v2: bool) -> None:
        """Zero [lo, hi) inside the (sub)cluster [sub_lo, sub_hi): the whole (sub)cluster when it already reads
        zeros (decided while holding its cluster, as QEMU widens unaligned zero writes), else explicit zeros."""
        img = self.img
        c = sub_lo >> img.cbits
        while not await self._reserve(c, c + 1):
            pass
        try:
            if await self._reads_zero(sub_lo, sub_hi):
                async with self.meta_lock:
                    await self._zero_cluster(c, sub_lo, sub_hi, unmap=unmap, from_discard=v2)
                return
        finally:
            self._release(c, c + 1)
        await self.pwritev(lo, memoryview(bytes(hi - lo)), ReqFlags.NONE)

    async def _reads_zero(self, start: int, end: int) -> bool:
        """Whether guest [start, end) is known to read zeros without reading data (QEMU's is_zero)."""
        pos = start
        while pos < end:
            m = await self.img.lookup(pos, end - pos)
            if m.type in (CT.ZERO_PLAIN, CT.ZERO_ALLOC):
                pass
            elif m.type in (CT.UNALLOCATED, CT.UNALLOCATED_ALLOC):
                if self.backing is not None:
                    from blockgraph.driver import Status
                    from blockgraph.io import block_status_above

                    bst, _ = await block_status_above(self.backing.node, pos, m.length)
                    if not bst.flags & Status.ZERO or bst.length < m.length:
                        return False
            else:
                return False
            pos += m.length
        return True

    async def pdiscard(self, offset: int, length: int) -> None:
        img = self.img
        cs = self.cluster_size
        lo = -(-offset // cs) * cs
        end = offset + length
        hi = end // cs * cs if end < img.h.size else -(-end // cs) * cs  # a partial last cluster counts at EOF
        if hi <= lo:
            return
        await self._zero_range(lo, hi, unmap=not self.options.discard_no_unref,  # type: ignore[attr-defined]
                               discard_type="request", from_discard=True)

    async def _zero_range(self, lo: int, hi: int, *, unmap: bool, discard_type: str, from_discard: bool = False
                          ) -> None:
        """Make [lo, hi) (sub)cluster-aligned read as zeros through L2 entries (or, v2 discard, unallocated)."""
        img = self.img
        if img.h.data_file_raw:  # the raw data file must read the same as the image
            await self.data.pwrite_zeroes(lo, hi - lo, ReqFlags.MAY_UNMAP if unmap else ReqFlags.NONE)
        _cs, cbits = self.cluster_size, img.cbits
        pos = lo
        while pos < hi:
            c = pos >> cbits
            chunk_end = min(hi, (c + 1) << cbits)
            if not await self._reserve(c, c + 1):
                continue
            try:
                async with self.meta_lock:
                    await self._zero_cluster(c, pos, chunk_end, unmap=unmap, from_discard=from_discard)
            finally:
                self._release(c, c + 1)
            pos = chunk_end

    async def _zero_cluster(self, c: int, lo: int, hi: int, *, unmap: bool, from_discard: bool) -> None:
        img = self.img
        cs, cbits = self.cluster_size, img.cbits
        i = c & (img.l2_entries - 1)
        entry, bitmap = await img.entry_at(c << cbits)
        if from_discard and not entry and not bitmap and self.backing is None:
            return  # discard leaves unallocated clusters alone without a backing file (discard_in_l2_slice)
        if not img.extl2 and img.classify(entry, bitmap, 0)[0] == CT.ZERO_PLAIN:
            return
        await self._meta_changing()
        _, table = await self._get_l2_for_write(c)
        entry, bitmap = img.l2_get(table, i)
        typ, _host = img.classify(entry, bitmap, 0)
        whole = lo == c << cbits and hi == (c + 1) << cbits
        v3 = img.h.version >= 3
        free = False
        if img.extl2:
            if whole and (unmap or typ == CT.COMPRESSED or not entry & OFLAG_COPIED):
                new_entry, new_bitmap, free = 0, _ALL_ZERO, bool(entry & (L2E_OFFSET_MASK | OFLAG_COMPRESSED))
            elif typ == CT.COMPRESSED or (entry & L2E_OFFSET_MASK and not entry & OFLAG_COPIED):
                raise NotSupported("partial zeroing of a shared cluster")
            else:
                bits = 0
                for sc in range((lo & (cs - 1)) // img.sc_size, ((hi - 1) & (cs - 1)) // img.sc_size + 1):
                    bits |= 1 << sc
                new_entry, new_bitmap = entry, (bitmap & ~bits) | (bits << SUBCLUSTERS)
        else:
            if from_discard and not v3:
                new_entry = 0
            elif not unmap and typ in (CT.NORMAL, CT.ZERO_ALLOC) and entry & OFLAG_COPIED:
                new_entry = (entry & (L2E_OFFSET_MASK | OFLAG_COPIED)) | OFLAG_ZERO
            else:
                new_entry = OFLAG_ZERO
            new_bitmap = 0
            free = new_entry & L2E_OFFSET_MASK == 0 and bool(entry & (L2E_OFFSET_MASK | OFLAG_COMPRESSED))
        if (new_entry, new_bitmap) == (entry, bitmap):
            return
        img.l2_put(table, i, new_entry, new_bitmap)
        img.l2_cache.mark_dirty(table.off)
        if free:
            await img.l2_cache.flush()
            await self.file.flush()
            shared = not entry & OFLAG_COPIED
            discard = self._discard_snapshot if shared else bool(getattr(self, "discard_request", False))
            await self._free_host(entry, CT.COMPRESSED if entry & OFLAG_COMPRESSED else CT.NORMAL,
                                  discard=discard)


async def try_discard(child: Any, offset: int, length: int) -> None:
    try:
        await child.pdiscard(offset, length)
    except (BlockIOError, NotSupported):
        pass


class FullDiscardMixin:
    """Discard whole clusters slice by slice (QEMU's qcow2_cluster_discard): shrinking and ``make_empty`` unmap
    them completely; dropping the live vm state after a snapshot leaves zero clusters."""

    img: Any
    file: Any
    meta_lock: Any
    backing: Any
    cluster_size: int

    async def discard_range_full(self, lo: int, hi: int) -> None:
        await self.discard_clusters(lo, hi, full=True,
                                    discard=self.options.pass_discard_other)  # type: ignore[attr-defined]

    async def discard_clusters(self, lo: int, hi: int, *, full: bool, discard: bool, lock_held: bool = False
                               ) -> None:
        """Guest clusters [lo, hi): ``full`` makes them unallocated (the backing file shows through), otherwise
        they read zeros (v2 without a backing file: unallocated). Each slice's entries reach the disk before
        the references they held are dropped; ``discard`` passes freed host clusters down. Takes meta_lock
        per slice (so requests interleave) unless the caller says it holds it."""
        img = self.img
        cbits = img.cbits
        c, last = lo >> cbits, -(-hi // self.cluster_size)
        while c < last:
            l1i = c >> img.l2_bits
            if not img.l2_offset(l1i) and (full or self.backing is None):
                c = min(last, (l1i + 1) << img.l2_bits)
                continue
            stop = min(last, img.slice_end(c))
            if lock_held:
                await self._discard_in_slice(c, stop, full, discard)
            else:
                async with self.meta_lock:
                    await self._discard_in_slice(c, stop, full, discard)
            c = stop

    def _discarded_entry(self, entry: int, bitmap: int, full: bool) -> tuple[int, int]:
        img = self.img
        if full:
            return 0, 0
        if self.backing is not None or entry & (L2E_OFFSET_MASK | OFLAG_COMPRESSED):
            if img.extl2:
                return 0, _ALL_ZERO
            return (OFLAG_ZERO if img.h.version >= 3 else 0), 0
        return entry, bitmap

    async def _discard_in_slice(self, c: int, stop: int, full: bool, discard: bool) -> None:
        img = self.img
        await self._meta_changing()  # type: ignore[attr-defined]
        _, table = await self._get_l2_for_write(c)  # type: ignore[attr-defined]
        old = []
        for k in range(c, stop):
            i = k & (img.l2_entries - 1)
            entry, bitmap = img.l2_get(table, i)
            new = self._discarded_entry(entry, bitmap, full)
            if new != (entry, bitmap):
                old.append(entry)
                img.l2_put(table, i, *new)
        if not old:
            return
        img.l2_cache.mark_dirty(table.off)
        await img.l2_cache.flush()
        await self.file.flush()
        for entry in old:
            if entry & (L2E_OFFSET_MASK | OFLAG_COMPRESSED):
                await self._free_host(  # type: ignore[attr-defined]
                    entry, CT.COMPRESSED if entry & OFLAG_COMPRESSED else CT.NORMAL, discard=discard)
