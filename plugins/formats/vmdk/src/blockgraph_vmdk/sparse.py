"""Sparse extents: grain directory -> grain tables -> grains, with the redundant copy and zeroed grains.

Writes keep a crash-safe order: grain data first (always at the end of the
file, so an interrupted allocation can only leave an unreferenced grain), then
the grain table entries (primary, then redundant). When the directory has no
table for a grain, an empty table is written and linked first, which maps
nothing, so every intermediate state reads as before. QEMU also syncs the file
after every table update; here durability comes with the next flush instead.
Compressed grains (streamOptimized) are in :mod:`blockgraph_vmdk.stream`.
"""

from __future__ import annotations

import asyncio
import errno
import sys
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from blockgraph.errors import OpenError

from .extent import COMPRESSED, DATA, SPARSE, UNALLOC, ZEROED, Extent
from .format import (
    FLAG_MARKER,
    FLAG_RGD,
    FLAG_ZERO_GRAIN,
    GTE_ZEROED,
    MARKER_FOOTER,
    MAX_EXTENT_SECTORS,
    SECTOR,
    SparseHeader,
    parse_marker,
)
from .stream import BaseReader, CompressedGrains

GT_CACHE = 64  # grain tables kept in memory per extent (each 2 KiB with 512 entries)


def _le32(raw: bytes | bytearray | memoryview) -> array:
    table = array("I")
    table.frombytes(bytes(raw))
    if sys.byteorder != "little":
        table.byteswap()
    return table


def _le32_bytes(table: array) -> bytes:
    if sys.byteorder != "little":
        table = array("I", table)
        table.byteswap()
    return table.tobytes()


class SparseExtent(CompressedGrains, Extent):
    kind = SPARSE
    entry_size = 4

    def __init__(self, *, header: SparseHeader, gd_offset: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.hdr = header
        self.grain = header.granularity * SECTOR
        self.gtes = header.num_gtes_per_gt
        self.gt_span = self.gtes * self.grain
        self.gd_offset = gd_offset  # sectors, the directory actually used (footer or header)
        self.compressed = header.compressed
        self.markers = bool(header.flags & FLAG_MARKER) and not header.cowd
        self.zero_grain = bool(header.flags & FLAG_ZERO_GRAIN) and not header.cowd
        self.gd = array("I")
        self.rgd: array | None = None
        self.gt_cache: OrderedDict[int, array] = OrderedDict()
        self.grain_cache: OrderedDict[int, bytes] = OrderedDict()
        self.pending: tuple[int, bytearray] | None = None  # compressed grain being assembled
        self.next_sector = 0
        self.appended = False  # compressed grains were appended: write a footer at close
        self.run_blocking: Callable[..., Any] | None = None  # the session's thread pool, for inflating

    # ------------------------------------------------------------ opening

    async def load(self, writable: bool) -> None:
        """Read the directories; the caller has validated the header."""
        flen = self.child.getlength()
        n = self.hdr.gd_entries
        self.gd = await self._read_dir(self.gd_offset, n, flen, "l1 table")
        if self.hdr.rgd_offset and self.hdr.flags & FLAG_RGD and not self.hdr.cowd:
            self.rgd = await self._read_dir(self.hdr.rgd_offset, n, flen, "l1 backup table")
        sectors = (flen + SECTOR - 1) // SECTOR
        if self.compressed:
            if writable:
                sectors = await self.before_footer(sectors)
            self.next_sector = max(sectors, self.hdr.grain_offset)
        else:
            g = self.hdr.granularity
            self.next_sector = (sectors + g - 1) // g * g

    async def _read_dir(self, sector: int, n: int, flen: int, what: str) -> array:
        off, size = sector * SECTOR, n * self.entry_size
        if off + size > flen:
            raise self._open_error(f"Could not read {what} from extent '{self.filename}': {n} entries at "
                                   f"offset {off} lie beyond the end of the file ({flen} bytes)")
        buf = bytearray(size)
        await self.child.preadv(off, memoryview(buf))
        return self._entries(buf)

    def _entries(self, raw: bytearray) -> array:
        """Directory or table entries (32-bit sector numbers here)."""
        return _le32(raw)

    async def before_footer(self, sectors: int) -> int:
        """Where the next compressed grain goes: over a footer + end-of-stream we wrote before, else at the end."""
        if sectors < 3 or self.child.getlength() % SECTOR:
            return sectors
        tail = bytearray(3 * SECTOR)
        await self.child.preadv((sectors - 3) * SECTOR, memoryview(tail))
        if parse_marker(tail)[1:] == (0, MARKER_FOOTER) and tail[SECTOR:SECTOR + 4] == b"KDMV" and \
                not any(tail[2 * SECTOR:2 * SECTOR + 16]):
            return max(sectors - 3, self.hdr.grain_offset)
        return sectors

    def _open_error(self, msg: str) -> Exception:
        return OpenError(msg)

    def _writable_at(self, sector: int, nbytes: int, what: str, voff: int) -> None:
        """Refuse to write metadata or data that a corrupt table places over the header or the descriptor."""
        meta_end = max(1, self.hdr.desc_offset + self.hdr.desc_size) if not self.hdr.cowd else 1
        if sector < meta_end:
            raise self.io_error(errno.EIO, "write", voff, nbytes,
                                f"{what} of '{self.filename}' at sector {sector} overlaps the header or the "
                                f"descriptor: the image is corrupt")

    # ------------------------------------------------------------ tables

    def _where(self, rel: int) -> tuple[int, int]:
        return rel // self.gt_span, rel // self.grain % self.gtes

    async def _gt(self, gd_i: int, op: str, voff: int) -> tuple[int, array] | None:
        """(sector, table) of grain table ``gd_i``, or None when the directory has no table there."""
        if gd_i >= len(self.gd):
            raise self.io_error(errno.EIO, op, voff, 0, f"grain directory of '{self.filename}' has no entry {gd_i}")
        sector = self._gt_sector(gd_i, self.gd[gd_i], op, voff)
        if not sector:
            return None
        table = self.gt_cache.get(sector)
        if table is not None:
            self.gt_cache.move_to_end(sector)
            return sector, table
        size = self.gtes * self.entry_size
        off = sector * SECTOR
        if off + size > self.child.getlength():
            raise self.io_error(errno.EIO, op, voff, 0, f"grain table {gd_i} of '{self.filename}' at offset {off} "
                                                        f"lies beyond the end of the file")
        buf = bytearray(size)
        await self.child.preadv(off, memoryview(buf))
        table = self._entries(buf)
        self.gt_cache[sector] = table
        if len(self.gt_cache) > GT_CACHE:
            self.gt_cache.popitem(last=False)
        return sector, table

    def _gt_sector(self, gd_i: int, entry: int, op: str, voff: int) -> int:
        """Where the grain table of directory entry ``entry`` is (0: none)."""
        return entry

    def _decode(self, gte: int) -> tuple[str, int]:
        """(state, host offset) of a grain table entry."""
        return self._state(gte), gte * SECTOR

    def _state(self, gte: int) -> str:
        if not gte:
            return UNALLOC
        if gte == GTE_ZEROED and self.zero_grain:
            return ZEROED
        return COMPRESSED if self.compressed else DATA

    async def lookup(self, rel: int, op: str = "read") -> tuple[str, int]:
        """(state, host offset of the grain) for the grain holding ``rel``."""
        gd_i, gt_i = self._where(rel)
        if self.pending is not None and self.pending[0] == rel // self.grain:
            return DATA, -1
        found = await self._gt(gd_i, op, self.start + rel)
        if found is None:
            return UNALLOC, 0
        return self._decode(found[1][gt_i])

    async def status(self, rel: int, length: int) -> tuple[str, int | None, int]:
        """(state, host offset or None, bytes) of the run of like grains at ``rel``, within one grain table."""
        in_grain = rel % self.grain
        n = min(length, self.grain - in_grain)
        if self.pending is not None and self.pending[0] == rel // self.grain:
            return COMPRESSED, None, n  # assembled in memory, not yet appended
        gd_i, gt_i = self._where(rel)
        found = await self._gt(gd_i, "block_status", self.start + rel)
        if found is None:
            return UNALLOC, None, min(length, (gd_i + 1) * self.gt_span - rel)
        table = found[1]
        state, host = self._decode(table[gt_i])
        expect = host + self.grain
        i = gt_i + 1
        while n < length and i < self.gtes:
            if self.pending is not None and self.pending[0] == (rel + n) // self.grain:
                break
            s, h = self._decode(table[i])
            if s != state or (state == DATA and h != expect):
                break
            n = min(length, n + self.grain)
            expect += self.grain
            i += 1
        return state, (host + in_grain if state == DATA else None), n

    async def _set_gtes(self, updates: dict[int, dict[int, int]], voff: int) -> None:
        """Write new entries (gd index -> {gt index: value}) to the grain table and its redundant copy."""
        for gd_i, entries in updates.items():
            found = await self._gt(gd_i, "write", voff)
            assert found is not None  # allocated by _ensure_gt before any grain was placed
            sector, table = found
            lo, hi = min(entries), max(entries)
            new = array("I", table[lo:hi + 1])
            for i, v in entries.items():
                new[i - lo] = v
            raw = _le32_bytes(new)
            backup = self.rgd[gd_i] if self.rgd is not None and gd_i < len(self.rgd) else 0
            self._writable_at(sector, len(raw), f"grain table {gd_i}", voff)
            if backup:
                self._writable_at(backup, len(raw), f"redundant grain table {gd_i}", voff)
            await self.child.pwritev(sector * SECTOR + lo * 4, memoryview(raw))
            if backup:
                await self.child.pwritev(backup * SECTOR + lo * 4, memoryview(raw))
            table[lo:hi + 1] = new

    async def _ensure_gt(self, gd_i: int, voff: int) -> None:
        """Make grain table ``gd_i`` (and its redundant copy) when the directory has none: tables, then GD."""
        if gd_i >= len(self.gd):
            raise self.io_error(errno.EIO, "write", voff, 0, f"grain directory of '{self.filename}' has no "
                                                             f"entry {gd_i}")
        if self.gd[gd_i]:
            return
        self._writable_at(self.gd_offset, 4, "grain directory", voff)
        if self.rgd is not None:
            self._writable_at(self.hdr.rgd_offset, 4, "redundant grain directory", voff)
        size = self.gtes * 4
        copies = 2 if self.rgd is not None else 1
        sectors = (size + SECTOR - 1) // SECTOR
        at = self._alloc(copies * sectors * SECTOR, "write", voff)
        await self.child.pwritev(at * SECTOR, memoryview(bytes(copies * sectors * SECTOR)))
        entry = bytearray(4)
        entry[:] = at.to_bytes(4, "little")
        await self.child.pwritev(self.gd_offset * SECTOR + gd_i * 4, memoryview(entry))
        self.gd[gd_i] = at
        if self.rgd is not None:
            entry[:] = (at + sectors).to_bytes(4, "little")
            await self.child.pwritev(self.hdr.rgd_offset * SECTOR + gd_i * 4, memoryview(entry))
            self.rgd[gd_i] = at + sectors

    def _alloc(self, nbytes: int, op: str, voff: int) -> int:
        """Sectors for ``nbytes`` at the end of the file (whole grains unless compressed)."""
        at = self.next_sector
        sectors = (nbytes + SECTOR - 1) // SECTOR
        if not self.compressed:
            g = self.hdr.granularity
            sectors = (sectors + g - 1) // g * g
        if at + sectors > MAX_EXTENT_SECTORS:
            raise self.io_error(errno.ENOSPC, op, voff, nbytes, f"extent '{self.filename}' is full (2 TiB)")
        self.next_sector = at + sectors
        return at

    # ------------------------------------------------------------ reading

    async def read(self, rel: int, buf: memoryview, base: BaseReader) -> None:
        """Resolve every grain first, then fetch them together: runs of adjacent grains are read at once."""
        jobs: list[Awaitable[None]] = []
        compressed: list[tuple[int, int, memoryview]] = []
        run: list[Any] = []  # [kind, host or virtual offset, start in buf, length]
        done = 0
        while done < len(buf):
            pos = rel + done
            in_grain = pos % self.grain
            n = min(len(buf) - done, self.grain - in_grain)
            piece = buf[done:done + n]
            state, host = await self.lookup(pos)
            kind, at = None, 0
            if host == -1:
                piece[:] = memoryview(self.pending[1])[in_grain:in_grain + n]
            elif state == ZEROED:
                piece[:] = bytes(n)
            elif state == COMPRESSED:
                compressed.append((host, pos, piece))
            else:
                kind, at = (UNALLOC, self.start + pos) if state == UNALLOC else (DATA, host + in_grain)
            if run and (kind != run[0] or at != run[1] + run[3] or done != run[2] + run[3]):
                jobs.append(self._fetch(run, buf, base))
                run = []
            if kind is not None:
                if run:
                    run[3] += n
                else:
                    run = [kind, at, done, n]
            done += n
        if run:
            jobs.append(self._fetch(run, buf, base))
        if compressed:
            jobs.append(self._read_compressed_batch(compressed))
        if len(jobs) == 1:
            await jobs[0]
        elif jobs:
            results = await asyncio.gather(*jobs, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r

    def _fetch(self, run: list[Any], buf: memoryview, base: BaseReader) -> Awaitable[None]:
        kind, at, start, n = run
        view = buf[start:start + n]
        if kind == UNALLOC:
            return base(at, view)
        return self._read_host(at, view, self.start + at)

    async def _read_host(self, host: int, piece: memoryview, voff: int) -> None:
        flen = self.child.getlength()
        if host >= flen:
            raise self.io_error(errno.EIO, "read", voff, len(piece),
                                f"grain at offset {host} of '{self.filename}' lies beyond the end of the file")
        avail = min(len(piece), flen - host)
        await self.child.preadv(host, piece[:avail])
        if avail < len(piece):
            piece[avail:] = bytes(len(piece) - avail)

    async def write(self, rel: int, buf: memoryview, base: BaseReader, flags: Any) -> None:
        if self.compressed:
            await self._write_compressed(rel, buf, base)
            return
        updates: dict[int, dict[int, int]] = {}
        run_at, run_len, run = -1, 0, []  # contiguous host writes gathered into one request
        done = 0
        while done < len(buf):
            pos = rel + done
            in_grain = pos % self.grain
            n = min(len(buf) - done, self.grain - in_grain, self.length - pos)
            piece = buf[done:done + n]
            state, host = await self.lookup(pos, "write")
            if state == DATA:
                self._writable_at(host // SECTOR, n, "grain", self.start + pos)
                seg_at, seg = host + in_grain, piece
            else:
                gd_i, gt_i = self._where(pos)
                await self._ensure_gt(gd_i, self.start + pos)
                grain_len = min(self.grain, self.length - (pos - in_grain))
                at = self._alloc(self.grain, "write", self.start + pos) * SECTOR
                if in_grain == 0 and n == grain_len:
                    seg = piece
                else:
                    whole = bytearray(grain_len)
                    if state == UNALLOC:
                        await base(self.start + pos - in_grain, memoryview(whole))
                    whole[in_grain:in_grain + n] = piece
                    seg = memoryview(whole)
                seg_at = at + (in_grain if seg is piece else 0)
                updates.setdefault(gd_i, {})[gt_i] = at // SECTOR
            if run and run_at + run_len == seg_at:
                run.append(seg)
                run_len += len(seg)
            else:
                await self._flush_run(run_at, run)
                run_at, run_len, run = seg_at, len(seg), [seg]
            done += n
        await self._flush_run(run_at, run)
        if updates:
            await self._set_gtes(updates, self.start + rel)

    async def _flush_run(self, at: int, run: list[memoryview]) -> None:
        if not run:
            return
        data = run[0] if len(run) == 1 else memoryview(b"".join(run))
        await self.child.pwritev(at, data)

    async def write_zeroes(self, rel: int, length: int, has_backing: bool, dry_run: bool) -> bool:
        """Zero whole grains through zeroed-grain entries, or skip grains that already read as zeros."""
        updates: dict[int, dict[int, int]] = {}
        done = 0
        while done < length:
            pos = rel + done
            in_grain = pos % self.grain
            grain_len = min(self.grain, self.length - (pos - in_grain))
            n = min(length - done, grain_len - in_grain)
            state, host = await self.lookup(pos, "write")
            whole = in_grain == 0 and n == grain_len
            if host == -1:
                return False
            if state == ZEROED or (state == UNALLOC and not has_backing):
                pass
            elif whole and self.zero_grain:
                gd_i, gt_i = self._where(pos)
                if not dry_run:
                    await self._ensure_gt(gd_i, self.start + pos)
                updates.setdefault(gd_i, {})[gt_i] = GTE_ZEROED
            else:
                return False
            done += n
        if updates and not dry_run:
            await self._set_gtes(updates, self.start + rel)
        return True

    # ------------------------------------------------------------ check

    async def check(self, messages: list[str]) -> bool:
        """QEMU's vmdk_co_check for this extent: every grain lies inside the file. False on the first problem."""
        flen = self.child.getlength()
        for gd_i in range(len(self.gd)):
            first = gd_i * self.gt_span
            if first >= self.length:
                break
            try:
                found = await self._gt(gd_i, "check", self.start + first)
            except Exception:
                messages.append(f"ERROR: could not get cluster_offset for sector {(self.start + first) // SECTOR}")
                return False
            if found is None:
                continue
            table = found[1]
            for gt_i in range(self.gtes):
                pos = first + gt_i * self.grain
                if pos >= self.length:
                    break
                state, host = self._decode(table[gt_i])
                if state in (DATA, COMPRESSED) and host >= flen:
                    messages.append(f"ERROR: cluster offset for sector {(self.start + pos) // SECTOR} "
                                    f"points after EOF")
                    return False
        return True

