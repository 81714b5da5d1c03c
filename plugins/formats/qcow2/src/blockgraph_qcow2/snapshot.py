"""Internal snapshots (docs/interop/qcow2.txt "Snapshots"; QEMU's qcow2-snapshot.c).

The snapshot table is read at open (``load_snapshots``; in check mode ``img check`` reads and repairs it
instead, see :mod:`.snapshot_check`) and replaced as a whole: a new table is written
to fresh clusters, flushed, then ``nb_snapshots`` and ``snapshots_offset`` are switched in one header
write and the old table freed. Creating a snapshot copies the active L1 table and adds one reference to
every L2 table and data cluster it reaches (clearing their COPIED flags); applying one takes references
for its L1, writes it over the active L1 and drops the old one's references; deleting drops the
snapshot's references and frees its L1. COPIED flags are recomputed from the refcounts each time.
"""

from __future__ import annotations

import contextlib
import errno
import struct
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import attrs
from blockgraph.driver import SnapshotInfo
from blockgraph.errors import BlockIOError, ImageCorrupt, OpenError

from .constants import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAX_L1_BYTES,
    MAX_SNAPSHOTS,
    OFLAG_COPIED,
    ClusterType,
)

if TYPE_CHECKING:
    from .image import Image, L2Slice

_ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes: l1 offset .. extra_data_size
_EXTRA = struct.Struct(">QQQ")  # vm_state_size_large, disk_size, icount
MAX_EXTRA_DATA = 1024
MAX_TABLE_BYTES = 64 << 20


@attrs.define
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int = 0
    icount: int = -1
    extra_data_size: int = _EXTRA.size
    unknown_extra: bytes = b""

    def info(self) -> SnapshotInfo:
        return SnapshotInfo(id=self.id, name=self.name, vm_state_size=self.vm_state_size, date_sec=self.date_sec,
                            date_nsec=self.date_nsec, vm_clock_nsec=self.vm_clock_nsec,
                            icount=None if self.icount in (-1, (1 << 64) - 1) else self.icount,
                            disk_size=self.disk_size)


def pack_table(snaps: list[Snapshot]) -> bytes:
    out = bytearray()
    for sn in snaps:
        out += bytes(-len(out) % 8)
        ident, name = sn.id.encode(), sn.name.encode()
        extra_size = max(_EXTRA.size, sn.extra_data_size)
        vm32 = sn.vm_state_size if sn.vm_state_size <= 0xFFFFFFFF else 0
        out += _ENTRY.pack(sn.l1_table_offset, sn.l1_size, len(ident), len(name), sn.date_sec, sn.date_nsec,
                           sn.vm_clock_nsec, vm32, extra_size)
        out += _EXTRA.pack(sn.vm_state_size, sn.disk_size, sn.icount & ((1 << 64) - 1))
        out += sn.unknown_extra[:extra_size - _EXTRA.size].ljust(extra_size - _EXTRA.size, b"\0")
        out += ident + name
    if len(out) > MAX_TABLE_BYTES:
        raise BlockIOError(errno.EFBIG, op="snapshot", detail="Snapshot table is too big")
    return bytes(out)


@attrs.define
class TableRead:
    """A snapshot table as read: its entries, its size in bytes on disk, and what a repairing read dropped."""

    snaps: list[Snapshot]
    size: int
    extra_dropped: int = 0  # entries whose extra data was cut to MAX_EXTRA_DATA
    reduced: int = 0  # overhanging entries dropped off the end (table too big)


class SnapshotTableError(OpenError):
    """QEMU's snapshot table refusals; ``reason`` and ``hint`` apart for ``img check``'s own lines."""

    def __init__(self, reason: str, hint: str = "", err: int = errno.EFBIG) -> None:
        super().__init__(f"{reason}\n{hint}" if hint else reason)
        self.reason, self.hint, self.errno = reason, hint, err


def _cstr(raw: bytes) -> str:
    """QEMU keeps ids and names as C strings: they end at the first NUL."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


class _TableReader:
    """Reads the table through a window of up to 1 MiB, so that tens of thousands of entries cost few reads."""

    WINDOW = 1 << 20

    def __init__(self, img: Image) -> None:
        self.img, self.flen = img, img.file.getlength()
        self.start, self.buf = 0, b""
        self.window = 4096  # grows on each refill: a small table costs one small read

    async def read(self, off: int, n: int) -> bytes:
        if off + n > self.flen:
            raise ImageCorrupt("Snapshot table exceeds the file size", node=self.img.node_name or None, offset=off)
        if not (self.start <= off and off + n <= self.start + len(self.buf)):
            size = min(max(n, self.window), self.flen - off)
            self.window = min(self.window * 4, self.WINDOW)
            buf = bytearray(size)
            if size:
                await self.img.file.preadv(off, memoryview(buf))
            self.start, self.buf = off, bytes(buf)
        pos = off - self.start
        return self.buf[pos:pos + n]


async def read_table(img: Image, nb: int | None = None, offset: int | None = None, repair: bool = False,
                     messages: list[str] | None = None) -> TableRead:
    """The snapshot table (QEMU's qcow2_do_read_snapshots); ``nb``/``offset`` default to the header's.

    Without ``repair`` an entry with too much extra data or a table past 64 MiB is a SnapshotTableError with
    QEMU's text and hint; with it, the excess extra data is cut and the overhanging entries dropped, each
    announced in ``messages`` as QEMU prints it.
    """
    h = img.h
    nb = h.nb_snapshots if nb is None else nb
    offset = h.snapshots_offset if offset is None else offset
    if not nb:
        return TableRead([], 0)
    rd = _TableReader(img)
    snaps: list[Snapshot] = []
    out = TableRead(snaps, 0)
    off = start = offset
    table_length = 0
    for i in range(nb):
        pre = off
        table_length += -table_length % 8
        off += -(off - start) % 8
        l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vm32, extra_size = _ENTRY.unpack(
            await rd.read(off, _ENTRY.size))
        off += _ENTRY.size
        kept = extra_size
        if extra_size > MAX_EXTRA_DATA:
            if not repair:
                raise SnapshotTableError(f"Too much extra metadata in snapshot table entry {i}",
                                         "You can force-remove this extra metadata with qemu-img check -r all")
            if messages is not None:
                messages.append(f"Discarding too much extra metadata in snapshot table entry {i} "
                                f"({extra_size} > {MAX_EXTRA_DATA})")
            out.extra_dropped += 1
            kept = MAX_EXTRA_DATA
        extra = await rd.read(off, kept)
        off += extra_size
        sn = Snapshot(l1_off, l1_size, "", "", dsec, dnsec, clock, vm32, h.size, -1, kept)
        if kept >= 8:
            sn.vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        if kept >= 16:
            sn.disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if kept >= 24:
            sn.icount = struct.unpack_from(">Q", extra, 16)[0]
            if sn.icount == (1 << 64) - 1:
                sn.icount = -1
        sn.unknown_extra = bytes(extra[_EXTRA.size:])
        names = await rd.read(off, id_len + name_len)
        off += id_len + name_len
        sn.id, sn.name = _cstr(names[:id_len]), _cstr(names[id_len:])
        table_length += _ENTRY.size + kept + id_len + name_len
        if table_length > MAX_TABLE_BYTES or off - start > 0x7FFFFFFF:
            if not repair:
                raise SnapshotTableError("Snapshot table is too big", f"You can force-remove all {nb - i} "
                                         "overhanging snapshots with qemu-img check -r all")
            if messages is not None:
                messages.append(f"Discarding {nb - i} overhanging snapshots (snapshot table is too big)")
            out.reduced += nb - i
            off = pre
            break
        snaps.append(sn)
    out.size = off - start
    return out


def validate_l1(img: Image, sn: Snapshot) -> None:
    if sn.l1_size * 8 > MAX_L1_BYTES:
        raise ImageCorrupt("Snapshot L1 table too large", node=img.node_name or None)
    if sn.l1_table_offset % img.cs or sn.l1_table_offset + sn.l1_size * 8 > img.file.getlength():
        raise ImageCorrupt("Snapshot L1 table offset invalid", node=img.node_name or None,
                           offset=sn.l1_table_offset)


async def read_l1(img: Image, offset: int, size: int) -> list[int]:
    buf = bytearray(size * 8)
    if buf:
        await img.file.preadv(offset, memoryview(buf))
    return list(struct.unpack(f">{size}Q", buf))


async def update_refcounts(img: Image, l1: list[int], addend: int) -> bool:
    """QEMU's qcow2_update_snapshot_refcount over the L1 table ``l1`` (modified in place).

    Adds ``addend`` (-1, 0, 1) to every L2 table and data cluster ``l1`` reaches and sets each entry's COPIED
    flag to "refcount is 1". Returns whether ``l1`` changed. L2 tables freed on the way leave the cache.
    """
    rc = img.rc
    if addend > 0:
        img.l2_cache.set_dependency(rc.cache)
    changed = False
    for i, l1e in enumerate(l1):
        l2_off = l1e & L1E_OFFSET_MASK
        if not l2_off:
            continue
        if l2_off % img.cs:
            raise img.corrupt(f"L2 table offset {l2_off:#x} unaligned (L1 index: {i:#x})")
        async for table in img.l2_slices(l2_off):
            await _update_slice_refcounts(img, table, addend)
        if addend:
            await rc.update(l2_off, 1, addend)
        refcount = await rc.get(l2_off >> img.cbits)
        if refcount == 0:
            img.discard_l2(l2_off)
        new_l1e = l2_off | (OFLAG_COPIED if refcount == 1 else 0)
        if new_l1e != l1e:
            l1[i] = new_l1e
            changed = True
    return changed


async def _update_slice_refcounts(img: Image, table: L2Slice, addend: int) -> None:
    rc = img.rc
    l2_off = table.table_off
    for j in img.slice_range(table):
        entry, bitmap = img.l2_get(table, j)
        new = entry & ~OFLAG_COPIED
        typ, host = img.classify(new, bitmap, 0)
        refcount = 0
        if typ == ClusterType.COMPRESSED:
            if addend:
                coff, nbytes = img.compressed_range(new)
                await rc.update(coff, nbytes, addend)
            refcount = 2  # never rewritten in place
        elif (new & L2E_OFFSET_MASK) and typ != ClusterType.COMPRESSED:
            host = new & L2E_OFFSET_MASK
            if addend and not img.has_data_file:
                await rc.update(host, 1, addend)
            refcount = 1 if img.has_data_file else await rc.get(host >> img.cbits)
        if refcount == 1:
            new |= OFLAG_COPIED
        if new != entry:
            table = await img.read_l2(l2_off, j)  # the same slice, read again if it left the cache
            img.l2_put(table, j, new, bitmap)
            img.l2_cache.mark_dirty(table.off)


class SnapshotMixin:
    """The driver's snapshot hooks; needs ``self.img``, ``self.meta_lock`` and ``self.node``."""

    img: Image
    snapshots: list[Snapshot]
    snapshots_size: int

    async def load_snapshots(self) -> None:
        h = self.img.h
        # QEMU's qcow2_validate_table in qcow2_do_open (the offset is checked even with no snapshot)
        if h.nb_snapshots > MAX_SNAPSHOTS:
            raise SnapshotTableError("Snapshot table too large")
        if h.snapshots_offset % self.img.cs or (h.nb_snapshots and not h.snapshots_offset):
            raise SnapshotTableError("Snapshot table offset invalid", err=errno.EINVAL)
        table = await read_table(self.img)
        self.snapshots, self.snapshots_size = table.snaps, table.size

    def snapshot_info_list(self) -> list[dict[str, Any]]:
        """The snapshots as QAPI SnapshotInfo dicts, for ``img info``."""
        out = []
        for sn in getattr(self, "snapshots", []):
            d: dict[str, Any] = {"id": sn.id, "name": sn.name, "vm-state-size": sn.vm_state_size,
                                 "date-sec": sn.date_sec, "date-nsec": sn.date_nsec,
                                 "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
                                 "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000}
            if sn.icount not in (-1, (1 << 64) - 1):
                d["icount"] = sn.icount
            out.append(d)
        return out

    async def snapshot_list(self) -> list[SnapshotInfo]:
        return [sn.info() for sn in self.snapshots]

    def _refuse_data_file(self) -> None:
        if self.img.has_data_file:
            raise BlockIOError(errno.ENOTSUP, op="snapshot", detail="snapshots are not supported with a data file")

    def _find(self, snapshot_id: str | None, name: str | None) -> int:
        for i, sn in enumerate(self.snapshots):
            if (snapshot_id is None or sn.id == snapshot_id) and (name is None or sn.name == name):
                return i
        return -1

    def _find_id_or_name(self, text: str) -> int:
        i = self._find(text, None)
        return i if i >= 0 else self._find(None, text)

    async def _write_table(self, snaps: list[Snapshot]) -> None:
        img = self.img
        data = pack_table(snaps)
        new_off = await img.rc.alloc_clusters(-(-len(data) // img.cs)) if data else 0
        await img.flush_metadata()
        await img.file.flush()
        if data:
            await img.file.pwritev(new_off, memoryview(data))
        await img.file.flush()
        old_off, old_size = img.h.snapshots_offset, self.snapshots_size
        img.h.nb_snapshots, img.h.snapshots_offset = len(snaps), new_off
        await img.file.pwritev(60, memoryview(struct.pack(">IQ", len(snaps), new_off)))
        await img.file.flush()
        if old_off and old_size:
            await img.rc.update(old_off, old_size, -1)
        self.snapshots, self.snapshots_size = snaps, len(data)

    @contextlib.asynccontextmanager
    async def _discarding_freed(self) -> AsyncIterator[None]:
        """Clusters a snapshot operation frees are discarded in the file once the metadata that no longer
        references them is on disk (``pass-discard-snapshot``, default on, as QEMU's QCOW2_DISCARD_SNAPSHOT).
        Use inside the metadata lock."""
        with self.img.rc.collecting_freed() as freed:
            yield
        if self.options.pass_discard_snapshot:  # type: ignore[attr-defined]
            await self.img.discard_free(freed)

    async def _locked(self) -> Any:
        lock = getattr(self, "meta_lock", None)
        if lock is None:
            import asyncio

            lock = self.meta_lock = asyncio.Lock()
        return lock

    async def snapshot_create(self, info: SnapshotInfo) -> None:
        self._refuse_data_file()
        img = self.img
        if len(self.snapshots) >= MAX_SNAPSHOTS:
            raise BlockIOError(errno.EFBIG, op="snapshot")
        async with await self._locked(), self._discarding_freed():
            await img.flush_metadata()
            ids = [int(sn.id) for sn in self.snapshots if sn.id.isdigit()]
            info.id = str(max(ids, default=0) + 1)
            l1_bytes = len(img.l1) * 8
            l1_off = await img.rc.alloc_clusters(-(-l1_bytes // img.cs)) if l1_bytes else 0
            await img.rc.flush()
            if l1_bytes:
                await img.file.pwritev(l1_off, memoryview(struct.pack(f">{len(img.l1)}Q", *img.l1)))
            if await update_refcounts(img, img.l1, 1):
                await img.write_l1()
            await img.flush_metadata()
            await img.file.flush()
            sn = Snapshot(l1_off, len(img.l1), info.id, info.name, info.date_sec, info.date_nsec,
                          info.vm_clock_nsec, info.vm_state_size, img.h.size,
                          -1 if info.icount is None else info.icount)
            await self._write_table([*self.snapshots, sn])
            if sn.vm_state_size:
                await self._drop_vmstate(sn.vm_state_size)
            await img.flush_metadata()

    async def _drop_vmstate(self, size: int) -> None:
        from .vmstate import discard_vmstate

        await discard_vmstate(self, size)

    async def snapshot_goto(self, name: str) -> None:
        self._refuse_data_file()
        i = self._find_id_or_name(name)
        if i < 0:
            raise BlockIOError(errno.ENOENT, op="snapshot", detail=f"Can't find snapshot '{name}'")
        img = self.img
        sn = self.snapshots[i]
        validate_l1(img, sn)
        async with await self._locked(), self._discarding_freed():
            await img.flush_metadata()
            if sn.disk_size != img.h.size:
                await self._snap_set_size(sn.disk_size)
            if sn.l1_size > len(img.l1):
                await grow_l1(img, sn.l1_size)
            new_l1 = await read_l1(img, sn.l1_table_offset, sn.l1_size)
            new_l1 += [0] * (len(img.l1) - len(new_l1))
            await update_refcounts(img, list(new_l1), 1)
            await img.flush_metadata()
            await img.file.flush()
            old = list(img.l1)
            img.l1[:] = new_l1
            await img.write_l1()
            await img.file.flush()
            await update_refcounts(img, old, -1)
            await update_refcounts(img, img.l1, 0)
            await img.write_l1()
            await img.flush_metadata()
            await img.file.flush()

    async def _snap_set_size(self, size: int) -> None:
        from blockgraph.io import sector_length

        img = self.img
        img.h.size = size
        await img.file.pwritev(24, memoryview(struct.pack(">Q", size)))
        node = getattr(getattr(self, "node", None), "graph_node", None)
        if node is not None:
            node.length = sector_length(size)

    async def snapshot_delete(self, snapshot_id: str | None, name: str | None) -> None:
        self._refuse_data_file()
        i = self._find(snapshot_id, name)
        if i < 0:
            raise BlockIOError(errno.ENOENT, op="snapshot", detail="Can't find the snapshot")
        img = self.img
        sn = self.snapshots[i]
        validate_l1(img, sn)
        async with await self._locked(), self._discarding_freed():
            await img.flush_metadata()
            await self._write_table(self.snapshots[:i] + self.snapshots[i + 1:])
            l1 = await read_l1(img, sn.l1_table_offset, sn.l1_size)
            await update_refcounts(img, l1, -1)
            if sn.l1_size:
                await img.rc.update(sn.l1_table_offset, sn.l1_size * 8, -1)
            if await update_refcounts(img, img.l1, 0):
                await img.write_l1()
            await img.flush_metadata()
            await img.file.flush()

    async def snapshot_load_tmp(self, snapshot_id: str | None, name: str | None) -> None:
        """Show a snapshot read-only in place of the active L1 (convert -l, measure -l); the virtual size stays
        what the image header says, as in QEMU."""
        if not getattr(self, "read_only", True):
            raise BlockIOError(errno.EINVAL, op="snapshot", detail="Device is not readonly")
        i = self._find(snapshot_id, name)
        if i < 0:
            raise BlockIOError(errno.ENOENT, op="snapshot", detail="Can't find snapshot")
        img = self.img
        sn = self.snapshots[i]
        validate_l1(img, sn)
        img.l1[:] = await read_l1(img, sn.l1_table_offset, sn.l1_size)
        img.l2_cache.clear_clean()


async def grow_l1(img: Image, entries: int) -> None:
    """Move the active L1 table to new clusters holding ``entries`` entries (header switched in one write)."""
    old_off, old_size = img.h.l1_table_offset, len(img.l1)
    if entries * 8 > MAX_L1_BYTES:
        raise img.corrupt("Active L1 table too large")
    new_l1 = img.l1 + [0] * (entries - old_size)
    new_off = await img.rc.alloc_clusters(-(-entries * 8 // img.cs))
    await img.flush_metadata()
    await img.file.pwritev(new_off, memoryview(struct.pack(f">{entries}Q", *new_l1)))
    await img.file.flush()
    await img.file.pwritev(36, memoryview(struct.pack(">IQ", entries, new_off)))
    await img.file.flush()
    img.h.l1_size, img.h.l1_table_offset = entries, new_off
    img.l1[:] = new_l1
    if old_size:
        await img.rc.update(old_off, old_size * 8, -1)

