"""Resize (grow with preallocation, shrink as QEMU allows) and metadata preallocation (qcow2_co_truncate)."""

from __future__ import annotations

import errno
import struct
from typing import Any

from blockgraph.driver import PreallocMode, ReqFlags
from blockgraph.errors import BlockGraphError, BlockIOError

from .constants import L1E_OFFSET_MASK, L2E_OFFSET_MASK, MAX_L1_BYTES, OFLAG_COPIED, SUBCLUSTERS

_ALL_ALLOC = (1 << SUBCLUSTERS) - 1


class ResizeMixin:
    img: Any
    file: Any
    data: Any
    node: Any
    cluster_size: int
    meta_lock: Any

    def _fail(self, err: int, detail: str) -> BlockIOError:
        return BlockIOError(err, node=self.node.node_name, op="truncate", detail=detail)

    async def truncate(self, length: int, exact: bool, prealloc: PreallocMode) -> None:
        img = self.img
        h = img.h
        if length % 512:
            raise self._fail(errno.EINVAL, "The new size must be a multiple of 512")
        if h.nb_snapshots and h.version < 3:
            raise self._fail(errno.ENOTSUP, "Can't resize a v2 image which has snapshots")
        old = h.size
        new_l1 = self._l1_size_for(length)
        if length < old:
            if prealloc is not PreallocMode.OFF:
                raise self._fail(errno.ENOTSUP, "Preallocation can't be used for shrinking an image")
            await self._shrink(length, new_l1)
            return
        async with self.meta_lock:
            await self.grow_l1(new_l1)
        if h.data_file_raw and prealloc is PreallocMode.OFF:
            prealloc = PreallocMode.METADATA
        if prealloc is PreallocMode.OFF:
            if img.has_data_file:
                await self.data.truncate(length, exact, PreallocMode.OFF)
        else:
            await self._set_size(length)  # preallocation maps clusters below the new size
            if prealloc is PreallocMode.METADATA or img.has_data_file:
                await self.preallocate(old, length, prealloc)
            else:
                await self._preallocate_area(old, length, prealloc)
        await self._set_size(length)

    def _l1_size_for(self, size: int) -> int:
        img = self.img
        clusters = -(-size // self.cluster_size)
        n = -(-clusters // img.l2_entries)
        if n * 8 > MAX_L1_BYTES:
            raise self._fail(errno.EFBIG, "File too large")
        return n

    async def _set_size(self, size: int) -> None:
        img = self.img
        async with self.meta_lock:
            await img.flush_metadata()
            await self.file.flush()
            img.h.size = size
            await self.file.pwritev(24, memoryview(struct.pack(">Q", size)))
            await self.file.flush()

    async def grow_l1(self, min_size: int) -> None:
        """Replace the L1 table by one of ``min_size`` entries (new clusters, flush, header switch, free old)."""
        img = self.img
        h = img.h
        if min_size <= h.l1_size:
            return
        nbytes = min_size * 8
        nclusters = -(-nbytes // self.cluster_size)
        if img.lazy:
            await img.set_dirty()
        new_off = await img.rc.alloc_clusters(nclusters)
        await img.rc.flush()
        new_l1 = img.l1 + [0] * (min_size - len(img.l1))
        await self.file.pwritev(new_off, memoryview(struct.pack(f">{min_size}Q", *new_l1)))
        await self.file.flush()
        old_off, old_size = h.l1_table_offset, h.l1_size
        await self.file.pwritev(36, memoryview(struct.pack(">IQ", min_size, new_off)))
        await self.file.flush()
        h.l1_size, h.l1_table_offset = min_size, new_off
        img.l1 = new_l1
        if old_size:
            await img.rc.update(old_off, old_size * 8, -1)

    async def preallocate(self, start: int, end: int, mode: PreallocMode) -> None:
        """Map every unallocated cluster of [start, end) to a host cluster (QEMU's preallocate_co)."""
        img = self.img
        cs, cbits = self.cluster_size, img.cbits
        c = start >> cbits
        last = -(-end // cs)
        host_end = 0
        while c < last:
            stop = min(last, img.slice_end(c))
            async with self.meta_lock:
                _, table = await self._get_l2_for_write(c)  # type: ignore[attr-defined]
                await self._meta_changing()  # type: ignore[attr-defined]
                todo = [k for k in range(c, stop) if not img.l2_get(table, k & (img.l2_entries - 1))[0]]
                if todo:
                    if img.has_data_file:
                        host = todo[0] << cbits
                    else:
                        host = await img.rc.alloc_clusters(len(todo))
                        await self._zero_reused(host, len(todo) << cbits)
                    _, table = await self._get_l2_for_write(c)  # type: ignore[attr-defined]
                    for n, k in enumerate(todo):
                        hoff = (k << cbits) if img.has_data_file else host + (n << cbits)
                        img.l2_put(table, k & (img.l2_entries - 1), hoff | OFLAG_COPIED,
                                   _ALL_ALLOC if img.extl2 else 0)
                        host_end = max(host_end, hoff + cs)
                    img.l2_cache.mark_dirty(table.off)
            c = stop
        async with self.meta_lock:
            await img.flush_metadata()
        target = self.data
        if img.has_data_file:
            host_end = max(host_end, end)
        if host_end > target.getlength():
            await target.truncate(host_end, False, mode if mode is not PreallocMode.METADATA else PreallocMode.OFF)

    async def _zero_reused(self, host: int, length: int) -> None:
        """Clusters freed earlier and allocated again still hold old data: zero them before an L2 entry maps
        them, so a preallocated cluster reads zeros. (QEMU 7.2 skips this and shows the stale bytes.)"""
        old_end = min(host + length, self.file.getlength())
        if old_end > host:
            await self.file.pwrite_zeroes(host, old_end - host, ReqFlags.NONE)
            self.img.l2_cache.needs_flush = True

    async def _preallocate_area(self, old: int, new: int, mode: PreallocMode) -> None:
        """falloc/full as QEMU: refcount structures for everything first (a new refcount table past the used
        clusters), then the data clusters in one run after it, the file grown with ``mode``, then L2 entries."""
        img = self.img
        cs, cbits = self.cluster_size, img.cbits
        async with self.meta_lock:
            if img.lazy:
                await img.set_dirty()
            await img.flush_metadata()
            last = await self._last_used_cluster()
            start = last + 1 if last >= 0 else -(-self.file.getlength() // cs)
            first_c = old >> cbits
            n_data = -(-new // cs) - first_c
            if n_data <= 0:
                return
            n_l2 = -(-n_data // img.l2_entries) + 1
            alloc_start = await img.rc.refcount_area(start, n_data + n_l2)
            await img.rc.alloc_clusters_at(alloc_start, n_data)
            await img.rc.flush()
        await self.file.truncate((alloc_start + n_data) << cbits, False, mode)
        head = old - (first_c << cbits)
        if head:  # the old partial last cluster moves into the new run: copy what it held
            buf = bytearray(head)
            await self.preadv(first_c << cbits, memoryview(buf), 0)  # type: ignore[attr-defined]
            await self.data.pwritev(alloc_start << cbits, memoryview(buf))
        c = first_c
        while c < first_c + n_data:
            stop = min(first_c + n_data, img.slice_end(c))
            async with self.meta_lock:
                await self._meta_changing()  # type: ignore[attr-defined]
                _, table = await self._get_l2_for_write(c)  # type: ignore[attr-defined]
                old_entries = []
                for k in range(c, stop):
                    i = k & (img.l2_entries - 1)
                    old_entries.append(img.l2_get(table, i)[0])
                    img.l2_put(table, i, ((alloc_start + k - first_c) << cbits) | OFLAG_COPIED,
                               _ALL_ALLOC if img.extl2 else 0)
                img.l2_cache.mark_dirty(table.off)
                img.l2_cache.needs_flush = True
                freed = [e for e in old_entries if e & L2E_OFFSET_MASK]
                if freed:
                    await img.l2_cache.flush()
                    await self.file.flush()
                    for e in freed:
                        await img.rc.update(e & L2E_OFFSET_MASK, cs, -1)
            c = stop
        async with self.meta_lock:
            await img.flush_metadata()

    async def _shrink(self, length: int, new_l1: int) -> None:
        img = self.img
        h = img.h
        cs = self.cluster_size
        if h.nb_snapshots:
            raise self._fail(errno.ENOTSUP, "Can't shrink an image which has snapshots")
        lo = -(-length // cs) * cs
        await self.discard_range_full(lo, -(-h.size // cs) * cs)  # type: ignore[attr-defined]
        async with self.meta_lock:
            await img.flush_metadata()
            await self.file.flush()
            freed = []
            for i in range(new_l1, len(img.l1)):
                off = img.l1[i] & L1E_OFFSET_MASK
                if off:
                    freed.append(off)
                img.l1[i] = 0
            if freed:
                await img.write_l1()
                await self.file.flush()
                for off in freed:
                    img.discard_l2(off)
                    await img.rc.update(off, cs, -1)
        await self._set_size(length)
        if img.has_data_file:
            try:
                await self.data.truncate(length, False, PreallocMode.OFF)
            except BlockGraphError:
                pass
        last = await self._last_used_cluster()
        if (last + 1) * cs < self.file.getlength():
            try:
                await self.file.truncate((last + 1) * cs, False, PreallocMode.OFF)
            except BlockGraphError:
                pass  # as QEMU: a file that cannot shrink just keeps its tail

    async def _last_used_cluster(self) -> int:
        img = self.img
        n = -(-self.file.getlength() // self.cluster_size)
        for c in range(n - 1, -1, -1):
            if await img.rc.get(c):
                return c
        return -1
