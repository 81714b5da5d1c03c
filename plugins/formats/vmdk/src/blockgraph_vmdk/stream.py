"""Compressed grains (streamOptimized): reading them in batches, appending new ones, the footer at close.

A mixin of :class:`~blockgraph_vmdk.sparse.SparseExtent`; it uses the extent's tables and allocator.
"""

from __future__ import annotations

import asyncio
import errno
import zlib
from collections.abc import Awaitable, Callable

from .format import MARKER_EOS, MARKER_FOOTER, SECTOR, SparseHeader, marker, parse_marker

GRAIN_CACHE = 4  # decompressed grains kept per compressed extent
BaseReader = Callable[[int, memoryview], Awaitable[None]]  # (virtual offset, buf): backing data or zeros


def _inflate(raw: bytearray, head: int, size: int, limit: int) -> bytes:
    """At most ``limit`` bytes out of the zlib stream ``raw[head:head+size]`` (zlib drops the GIL)."""
    return zlib.decompressobj().decompress(memoryview(raw)[head:head + size], limit)


def _deflate_many(views: list[memoryview]) -> list[bytes]:
    """zlib streams of several grains (QEMU's compress(): the default level)."""
    return [zlib.compress(v) for v in views]


def _inflate_many(jobs: list[tuple[bytearray, int, int]], limit: int) -> list[bytes | None]:
    """Inflate several grains in one trip to the thread pool; None for one that does not decompress."""
    out: list[bytes | None] = []
    for raw, off, size in jobs:
        try:
            out.append(_inflate(raw, off, size, limit))
        except zlib.error:
            out.append(None)
    return out


class CompressedGrains:
    """Grain markers: u64 sector, u32 size, zlib data, padded to a sector."""

    async def _read_compressed_batch(self, items: list[tuple[int, int, memoryview]]) -> None:
        """Compressed grains of one request: adjacent ones (as a stream lays them out) in one read and one inflate."""
        todo = []
        for host, pos, piece in items:
            cached = self.grain_cache.get(host)
            if cached is not None:
                self._copy_out(cached, host, pos, piece)
            else:
                todo.append((host, pos, piece))
        if not self.markers or len(todo) < 2:
            for host, pos, piece in todo:
                await self._read_compressed(host, pos, piece)
            return
        todo.sort(key=lambda t: t[0])
        flen = self.child.getlength()
        reach = 12 + self.grain + SECTOR  # a grain marker with data that did not compress
        group: list[tuple[int, int, memoryview]] = []
        for item in todo:
            if group and (item[0] - group[-1][0] > reach or item[0] - group[0][0] > 8 * 1024 * 1024):
                await self._inflate_group(group, flen, reach)
                group = []
            group.append(item)
        await self._inflate_group(group, flen, reach)

    async def _inflate_group(self, group: list[tuple[int, int, memoryview]], flen: int, reach: int) -> None:
        first = group[0][0]
        if first >= flen:
            await self._read_compressed(*group[0])  # reports the error
        span = bytearray(min(flen, group[-1][0] + reach) - first)
        await self.child.preadv(first, memoryview(span))
        slices, rest = [], []
        for host, pos, piece in group:
            off = host - first
            size = parse_marker(span[off:off + 12])[1] if off + 12 <= len(span) else 0
            if 0 < size <= 2 * self.grain and off + 12 + size <= len(span):
                slices.append((host, pos, piece, off + 12, size))
            else:
                rest.append((host, pos, piece))  # odd or corrupt: the single-grain path explains it
        if slices:
            jobs = [(span, off, size) for _h, _p, _pc, off, size in slices]
            if self.run_blocking is not None:
                out = await self.run_blocking(_inflate_many, jobs, self.grain)
            else:
                out = _inflate_many(jobs, self.grain)
            for (host, pos, piece, _off, _size), data in zip(slices, out, strict=True):
                if data is None:
                    rest.append((host, pos, piece))
                    continue
                self._remember(host, data)
                self._copy_out(data, host, pos, piece)
        for host, pos, piece in rest:
            await self._read_compressed(host, pos, piece)

    def _remember(self, host: int, data: bytes) -> None:
        self.grain_cache[host] = data
        if len(self.grain_cache) > GRAIN_CACHE:
            self.grain_cache.popitem(last=False)

    def _copy_out(self, grain: bytes, host: int, pos: int, piece: memoryview) -> None:
        in_grain = pos % self.grain
        if in_grain + len(piece) > len(grain):
            raise self.io_error(errno.EIO, "read", self.start + pos, len(piece),
                                f"compressed grain at offset {host} of '{self.filename}' is short")
        piece[:] = memoryview(grain)[in_grain:in_grain + len(piece)]

    async def _read_compressed(self, host: int, pos: int, piece: memoryview) -> None:
        in_grain = pos % self.grain
        grain = await self._grain(host, pos)
        if in_grain + len(piece) > len(grain):
            raise self.io_error(errno.EIO, "read", self.start + pos, len(piece),
                                f"compressed grain at offset {host} of '{self.filename}' is short")
        piece[:] = memoryview(grain)[in_grain:in_grain + len(piece)]

    async def _grain(self, host: int, pos: int) -> bytes:
        """The decompressed grain whose marker (or zlib stream) starts at ``host``."""
        cached = self.grain_cache.get(host)
        if cached is not None:
            self.grain_cache.move_to_end(host)
            return cached
        flen = self.child.getlength()
        voff = self.start + pos - pos % self.grain

        def bad(why: str) -> Exception:
            return self.io_error(errno.EIO, "read", voff, self.grain,
                                 f"compressed grain at offset {host} of '{self.filename}' {why}")

        if host >= flen:
            raise bad("lies beyond the end of the file")
        head = 12 if self.markers else 0
        want = min(flen - host, head + self.grain + SECTOR if self.markers else 2 * self.grain)
        raw = bytearray(want)
        await self.child.preadv(host, memoryview(raw))
        size = len(raw) - head
        if self.markers:
            size = parse_marker(raw)[1]
            if not 0 < size <= 2 * self.grain:
                raise bad(f"has an invalid size {size}")
            if head + size > len(raw):
                if host + head + size > flen:
                    raise bad("lies beyond the end of the file")
                more = bytearray(head + size - len(raw))
                await self.child.preadv(host + len(raw), memoryview(more))
                raw += more
        try:
            if self.run_blocking is not None and size > 4096:
                data = await self.run_blocking(_inflate, raw, head, size, self.grain)
            else:
                data = _inflate(raw, head, size, self.grain)
        except zlib.error as e:
            raise bad(f"does not decompress ({e})") from None
        self._remember(host, data)
        return data

    # ------------------------------------------------------------ writing

    async def _write_compressed(self, rel: int, buf: memoryview, base: BaseReader) -> None:
        if not self.markers:
            raise self.io_error(errno.ENOTSUP, "write", self.start + rel, len(buf),
                                f"compressed extent '{self.filename}' has no grain markers; it can only be read")
        whole: list[tuple[int, memoryview]] = []  # complete grains, compressed together at the end
        done = 0
        while done < len(buf):
            pos = rel + done
            in_grain = pos % self.grain
            index = pos // self.grain
            grain_len = min(self.grain, self.length - (pos - in_grain))
            n = min(len(buf) - done, grain_len - in_grain)
            piece = buf[done:done + n]
            done += n
            if self.pending is not None and self.pending[0] == index:
                self.pending[1][in_grain:in_grain + n] = piece
                if in_grain + n == grain_len:
                    await self.commit()  # a sequential writer has finished this grain
                continue
            if in_grain == 0 and n == grain_len:
                whole.append((index, piece))
                continue
            await self.commit()
            assembled = bytearray(grain_len)
            await self.read(pos - in_grain, memoryview(assembled), base)
            assembled[in_grain:in_grain + n] = piece
            self.pending = (index, assembled)
        if whole:
            await self._append(whole)

    async def commit(self) -> None:
        """Append the grain being assembled, if any."""
        if self.pending is not None:
            index, assembled = self.pending
            await self._append([(index, memoryview(assembled))])
            self.pending = None

    async def _append(self, grains: list[tuple[int, memoryview]]) -> None:
        """Compress grains (on the thread pool, in parallel), append them as markers in one write, then map them."""
        for index, _data in grains:
            pos = index * self.grain
            await self._ensure_gt(self._where(pos)[0], self.start + pos)
        views = [data for _i, data in grains]
        if self.run_blocking is not None and len(views) > 1:
            parts = [views[i::2] for i in range(2)]
            done = await asyncio.gather(*(self.run_blocking(_deflate_many, p) for p in parts))
            comps: list[bytes] = [b""] * len(views)
            for i, part in enumerate(done):
                comps[i::2] = part
        elif self.run_blocking is not None:
            comps = await self.run_blocking(_deflate_many, views)
        else:
            comps = _deflate_many(views)
        records: list[bytes] = []
        updates: dict[int, dict[int, int]] = {}
        first = -1
        for (index, _data), comp in zip(grains, comps, strict=True):
            pos = index * self.grain
            rec = marker(pos // SECTOR, len(comp)) + comp
            rec += bytes(-len(rec) % SECTOR)
            at = self._alloc(len(rec), "write", self.start + pos)
            first = at if first < 0 else first
            records.append(rec)
            gd_i, gt_i = self._where(pos)
            updates.setdefault(gd_i, {})[gt_i] = at
        self.appended = True
        await self.child.pwritev(first * SECTOR, memoryview(b"".join(records) if len(records) > 1 else records[0]))
        await self._set_gtes(updates, self.start + grains[0][0] * self.grain)

    async def close(self) -> None:
        """Append the last assembled grain, then footer and end-of-stream after appended grains."""
        await self.commit()
        if not self.appended:
            return
        hdr = self.hdr
        footer_hdr = SparseHeader(hdr.version, hdr.flags, hdr.capacity, hdr.granularity, hdr.desc_offset,
                                  hdr.desc_size, hdr.num_gtes_per_gt, hdr.rgd_offset, self.gd_offset,
                                  hdr.grain_offset, hdr.compress_algorithm)
        tail = marker(1, 0, MARKER_FOOTER) + footer_hdr.pack() + marker(0, 0, MARKER_EOS)
        at = self.next_sector
        await self.child.pwritev(at * SECTOR, memoryview(tail))
        self.appended = False

