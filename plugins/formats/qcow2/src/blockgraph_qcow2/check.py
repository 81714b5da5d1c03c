"""``img check`` for qcow2: refcounts recomputed from every structure and compared (QEMU's qcow2-refcount.c).

Every cluster the image uses is counted in memory: the header, the active and the snapshots' L1 and L2
tables and their data (compressed clusters by their byte ranges), the snapshot table, the refcount table
and blocks, the bitmap directory and tables. The on-disk refcounts are then compared with that count:
higher ones are leaks, lower ones corruptions. ``-r leaks`` / ``-r all`` fix the mismatches in place, and a
refcount structure that cannot be trusted (a block missing, misplaced or shared) is rebuilt from the
in-memory count with ``-r all``. Last, the COPIED flags of the active tables are checked against the
refcounts. The per-problem lines are QEMU's and go into ``CheckResult.messages``.
"""

from __future__ import annotations

import errno
import struct
from array import array
from typing import TYPE_CHECKING, Any

from blockgraph.driver import CheckFix, CheckResult
from blockgraph.errors import BlockGraphError, BlockIOError

from .check_rebuild import decode_block
from .constants import (
    AUTOCLEAR_BITMAPS,
    INCOMPAT_CORRUPT,
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    MAX_L1_BYTES,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
)
from .header import bitmaps_ext

if TYPE_CHECKING:
    from .image import Image

BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_RESERVED_MASK = 0xFF000000000001FE
ALL_ALLOC = (1 << 32) - 1
NORMAL, ZERO_PLAIN, ZERO_ALLOC, COMPRESSED, UNALLOCATED = range(5)


class Checker:
    """One check run over an open image (``drv``: the qcow2 driver, for its snapshots and file)."""

    def __init__(self, drv: Any, res: CheckResult) -> None:
        self.drv = drv
        self.img: Image = drv.img
        self.res = res
        self.msg = res.messages.append
        img = self.img
        self.cs, self.cbits = img.cs, img.cbits
        self.max_ref = (1 << img.rc.bits) - 1
        self.file_len = img.file.getlength()
        self.nb_clusters = -(-self.file_len // self.cs)
        self.refs = array("Q", bytes(8 * self.nb_clusters))
        self.rebuild = False

    # ------------------------------------------------------------ counting

    def inc(self, offset: int, size: int) -> None:
        if size <= 0:
            return
        if offset + size - self.file_len >= self.cs:
            self.msg(f"ERROR: counting reference for region exceeding the end of the file by one cluster or "
                     f"more: offset 0x{offset:x} size 0x{size:x}")
            self.res.corruptions += 1
            return
        first, last = offset >> self.cbits, (offset + size - 1) >> self.cbits
        if last >= len(self.refs):
            self.refs.extend(array("Q", bytes(8 * (last + 1 - len(self.refs)))))
        if last >= self.nb_clusters:  # QEMU's count grows past the file end, and so does what it compares
            self.nb_clusters = last + 1
        for k in range(first, last + 1):
            if self.refs[k] == self.max_ref:
                self.msg(f"ERROR: overflow cluster offset=0x{k << self.cbits:x}")
                self.msg("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a "
                         "clean copy if the image cannot be opened for writing")
                self.res.corruptions += 1
                continue
            self.refs[k] += 1

    async def read(self, offset: int, n: int) -> bytearray:
        """``n`` bytes at ``offset``; what lies past the end of the file reads as zeros (as QEMU's file driver)."""
        buf = bytearray(n)
        have = max(0, min(n, self.file_len - offset))
        if have:
            await self.img.file.preadv(offset, memoryview(buf)[:have])
        return buf

    def cluster_type(self, entry: int) -> int:
        img = self.img
        if entry & OFLAG_COMPRESSED:
            return COMPRESSED
        if entry & OFLAG_ZERO and not img.extl2:
            return ZERO_ALLOC if entry & L2E_OFFSET_MASK else ZERO_PLAIN
        if not entry & L2E_OFFSET_MASK:
            return NORMAL if img.has_data_file and entry & OFLAG_COPIED else UNALLOCATED
        return NORMAL

    async def check_l2(self, l2_off: int, frag: bool, fix: CheckFix) -> None:
        img, res = self.img, self.res
        esize = 16 if img.extl2 else 8
        table = await self.read(l2_off, self.cs)
        next_contiguous = 0
        if table.count(0) == len(table):  # an empty table (or one past the end of the file) has nothing to count
            return
        vals = struct.unpack(f">{self.cs // 8}Q", table)
        step = esize // 8
        for i in range(img.l2_entries):
            entry = vals[i * step]
            bitmap = vals[i * step + 1] if img.extl2 else 0
            if not entry and not bitmap:
                continue
            typ = self.cluster_type(entry)
            if typ != COMPRESSED and entry & L2E_STD_RESERVED_MASK:
                self.msg(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            if typ == COMPRESSED:
                if entry & OFLAG_COPIED:
                    self.msg(f"ERROR: coffset=0x{entry & img.compressed_mask:x}: copied flag must never be set "
                             "for compressed clusters")
                    entry &= ~OFLAG_COPIED
                    res.corruptions += 1
                if img.has_data_file:
                    self.msg(f"ERROR compressed cluster {i} with data file, entry=0x{entry:x}")
                    res.corruptions += 1
                    continue
                if bitmap:
                    self.msg(f"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, "
                             f"entry=0x{entry:x}")
                    res.corruptions += 1
                    continue
                coff, csize = img.compressed_range(entry)
                self.inc(coff, csize)
                if frag:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
            elif typ in (NORMAL, ZERO_ALLOC):
                offset = entry & L2E_OFFSET_MASK
                if (bitmap >> 32) & bitmap:
                    res.corruptions += 1
                    self.msg(f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation "
                             "bitmap")
                if offset % self.cs:
                    res.corruptions += 1
                    has_data = bool(bitmap & ALL_ALLOC) if img.extl2 else not entry & OFLAG_ZERO
                    if not has_data:
                        repair = bool(fix & CheckFix.ERRORS)
                        self.msg(f"{'Repairing' if repair else 'ERROR'} offset={offset:x}: Preallocated cluster "
                                 "is not properly aligned; L2 entry corrupted.")
                        if repair and await self.zero_entry(l2_off, i, bitmap):
                            continue
                    else:
                        self.msg(f"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry "
                                 "corrupted.")
                if frag:
                    res.allocated_clusters += 1
                    if next_contiguous and offset != next_contiguous:
                        res.fragmented_clusters += 1
                    next_contiguous = offset + self.cs
                if not img.has_data_file:
                    self.inc(offset, self.cs)
            elif typ == UNALLOCATED and bitmap & ALL_ALLOC:
                res.corruptions += 1
                self.msg("ERROR: Unallocated cluster has non-zero subcluster allocation map")

    async def zero_entry(self, l2_off: int, i: int, bitmap: int) -> bool:
        img = self.img
        if img.extl2:
            bitmap = (bitmap | bitmap << 32) & (ALL_ALLOC << 32)
            data = struct.pack(">QQ", 0, bitmap)
        else:
            data = struct.pack(">Q", OFLAG_ZERO)
        try:
            await img.file.pwritev(l2_off + i * len(data), memoryview(data))
            await img.file.flush()
        except BlockGraphError as e:
            self.msg(f"ERROR: Failed to overwrite L2 table entry: {e}")
            self.res.check_errors += 1
            return False
        img.discard_l2(l2_off)
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1
        return True

    async def check_l1(self, l1_off: int, l1_size: int, frag: bool, fix: CheckFix) -> None:
        if not l1_size:
            return
        self.inc(l1_off, l1_size * 8)
        buf = await self.read(l1_off, l1_size * 8)
        for e in struct.unpack(f">{l1_size}Q", buf):
            if not e:
                continue
            if e & L1E_RESERVED_MASK:
                self.msg(f"ERROR found L1 entry with reserved bits set: {e:x}")
                self.res.corruptions += 1
            l2_off = e & L1E_OFFSET_MASK
            self.inc(l2_off, self.cs)
            if l2_off % self.cs:
                self.msg(f"ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted")
                self.res.corruptions += 1
            await self.check_l2(l2_off, frag, fix)

    async def check_bitmaps(self) -> None:
        h = self.img.h
        ext = bitmaps_ext(h)
        if ext is None or not ext["nb_bitmaps"] or not h.autoclear_features & AUTOCLEAR_BITMAPS:
            return
        self.inc(ext["directory_offset"], ext["directory_size"])
        if ext["directory_offset"] + ext["directory_size"] > self.file_len or ext["directory_size"] > 64 << 20:
            self.res.corruptions += 1
            return
        d = await self.read(ext["directory_offset"], ext["directory_size"])
        pos = 0
        for _ in range(ext["nb_bitmaps"]):
            if pos + 24 > len(d):
                self.res.corruptions += 1
                return
            toff, tsize, _flags, _t, _g, name_size, extra = struct.unpack_from(">QIIBBHI", d, pos)
            pos += -(-(24 + extra + name_size) // 8) * 8
            self.inc(toff, tsize * 8)
            if toff % self.cs or toff + tsize * 8 > self.file_len:
                self.res.corruptions += 1
                continue
            table = await self.read(toff, tsize * 8)
            for e in struct.unpack(f">{tsize}Q", table):
                off = e & BME_OFFSET_MASK
                if e & BME_RESERVED_MASK or (off and off % self.cs) or (off and e & 1):
                    self.res.corruptions += 1
                    continue
                if off:
                    self.inc(off, self.cs)

    async def check_refblocks(self, fix: CheckFix) -> None:
        rc = self.img.rc
        for i, e in enumerate(rc.table):
            offset = e & REFT_OFFSET_MASK
            cluster = offset >> self.cbits
            if e & REFT_RESERVED_MASK:
                self.msg(f"ERROR refcount table entry {i} has reserved bits set")
                self.res.corruptions += 1
                self.rebuild = True
                continue
            if offset % self.cs:
                self.msg(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
                self.res.corruptions += 1
                self.rebuild = True
                continue
            if cluster >= self.nb_clusters:
                self.res.corruptions += 1
                repair = bool(fix & CheckFix.ERRORS)
                self.msg(f"{'Repairing' if repair else 'ERROR'} refcount block {i} is outside image")
                if repair:
                    try:  # grow the file so that the block exists (zeros), as QEMU does
                        await self.img.file.truncate(offset + self.cs)
                    except BlockGraphError as e:
                        self.rebuild = True
                        self.msg(f"ERROR could not resize image: {getattr(e, 'strerror', e)}")
                        continue
                    self.file_len = self.img.file.getlength()
                    self.nb_clusters = -(-self.file_len // self.cs)
                    self.res.corruptions -= 1
                    self.res.corruptions_fixed += 1
                    self.inc(offset, self.cs)
                continue
            if offset:
                self.inc(offset, self.cs)
                if self.refs[cluster] != 1:
                    self.msg(f"ERROR refcount block {i} refcount={self.refs[cluster]}")
                    self.res.corruptions += 1
                    self.rebuild = True

    async def calculate(self, fix: CheckFix) -> None:
        img, h = self.img, self.img.h
        self.inc(0, self.cs)
        await self.check_l1(h.l1_table_offset, h.l1_size, True, fix)
        snaps = getattr(self.drv, "snapshots", [])
        if img.has_data_file and snaps:
            self.msg(f"ERROR {len(snaps)} snapshots in image with data file")
            self.res.corruptions += 1
        for sn in snaps:
            if sn.l1_table_offset % self.cs:
                self.msg(f"ERROR snapshot {sn.id} ({sn.name}) l1_offset={sn.l1_table_offset:#x}: L1 table is not "
                         "cluster aligned; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            if sn.l1_size > MAX_L1_BYTES // 8:
                self.msg(f"ERROR snapshot {sn.id} ({sn.name}) l1_size={sn.l1_size:#x}: L1 table is too large; "
                         "snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            await self.check_l1(sn.l1_table_offset, sn.l1_size, False, fix)
        self.inc(h.snapshots_offset, getattr(self.drv, "snapshots_size", 0))
        self.inc(h.refcount_table_offset, len(img.rc.table) * 8)
        await self.check_bitmaps()
        await self.check_refblocks(fix)

    async def compare(self, fix: CheckFix) -> int:
        """Compare on-disk refcounts with the count; repair what ``fix`` allows. Returns the highest used cluster."""
        rc, res = self.img.rc, self.res
        highest = 0
        per = rc.entries
        i = 0
        while i < self.nb_clusters:
            r = i // per
            end = min(self.nb_clusters, (r + 1) * per)
            try:
                off = rc.block_offset(r)
                disk = decode_block(rc, await rc.cache.get(off)) if off else None
            except BlockGraphError as e:
                for k in range(i, end):
                    self.msg(f"Can't get refcount for cluster {k}: {getattr(e, 'strerror', e)}")
                    res.check_errors += 1
                i = end
                continue
            for k in range(i, end):
                r1 = disk[k - r * per] if disk is not None else 0
                r2 = self.refs[k] if k < len(self.refs) else 0
                if r1 or r2:
                    highest = k
                if r1 != r2:
                    await self._mismatch(k, r1, r2, fix)
            i = end
        return highest

    async def _mismatch(self, i: int, r1: int, r2: int, fix: CheckFix) -> None:
        res = self.res
        counter = None
        if r1 == 0:
            self.rebuild = True
        elif r1 > r2 and fix & CheckFix.LEAKS:
            counter = "leaks_fixed"
        elif r1 < r2 and fix & CheckFix.ERRORS:
            counter = "corruptions_fixed"
        kind = "Repairing" if counter else "ERROR" if r1 < r2 else "Leaked"
        self.msg(f"{kind} cluster {i} refcount={r1} reference={r2}")
        if counter:
            try:
                await self.img.rc.update(i << self.cbits, 1, r2 - r1)
                setattr(res, counter, getattr(res, counter) + 1)
                return
            except BlockGraphError:
                pass
        if r1 < r2:
            res.corruptions += 1
        else:
            res.leaks += 1

    async def check_copied(self, fix: CheckFix) -> None:
        img, rc, res = self.img, self.img.rc, self.res
        if fix & CheckFix.ERRORS:
            repair = True
        elif fix & CheckFix.LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        esize = 16 if img.extl2 else 8
        for i, l1e in enumerate(img.l1):
            l2_off = l1e & L1E_OFFSET_MASK
            if not l2_off:
                continue
            try:
                refcount = await rc.get(l2_off >> self.cbits)
            except BlockGraphError:
                continue
            if (refcount == 1) != bool(l1e & OFLAG_COPIED):
                res.corruptions += 1
                self.msg(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED L2 cluster: l1_index={i} "
                         f"l1_entry={l1e:x} refcount={refcount}")
                if repair:
                    img.l1[i] = l1e | OFLAG_COPIED if refcount == 1 else l1e & ~OFLAG_COPIED
                    await img.write_l1_entry(i)
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            table = await self.read(l2_off, self.cs)
            dirty = 0
            for j in range(img.l2_entries):
                entry = struct.unpack_from(">Q", table, j * esize)[0]
                if self.cluster_type(entry) not in (NORMAL, ZERO_ALLOC):
                    continue
                if img.has_data_file:
                    refcount = 1
                else:
                    try:
                        refcount = await rc.get((entry & L2E_OFFSET_MASK) >> self.cbits)
                    except BlockGraphError:
                        continue
                if (refcount == 1) != bool(entry & OFLAG_COPIED):
                    res.corruptions += 1
                    self.msg(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED data cluster: l2_entry={entry:x} "
                             f"refcount={refcount}")
                    if repair:
                        entry = entry | OFLAG_COPIED if refcount == 1 else entry & ~OFLAG_COPIED
                        struct.pack_into(">Q", table, j * esize, entry)
                        dirty += 1
            if dirty:
                img.discard_l2(l2_off)
                await img.file.pwritev(l2_off, memoryview(table))
                res.corruptions -= dirty
                res.corruptions_fixed += dirty


async def check_refcounts(drv: Any, res: CheckResult, fix: CheckFix) -> None:
    """QEMU's qcow2_check_refcounts; raises BlockGraphError when the check itself cannot go on."""
    from .check_rebuild import rebuild_refcounts

    img = drv.img
    c = Checker(drv, res)
    res.total_clusters = -(-img.h.size // img.cs)
    await c.calculate(fix)
    pre = _copy(res)
    highest = await c.compare(CheckFix.NONE)
    if c.rebuild and fix & CheckFix.ERRORS:
        old = _copy(res)
        res.messages.append("Rebuilding refcount structure")
        await rebuild_refcounts(img, c)
        res.corruptions = res.leaks = 0
        c2 = Checker(drv, CheckResult())
        await c2.calculate(CheckFix.NONE)
        res.corruptions += c2.res.corruptions
        res.messages.extend(c2.res.messages)
        fresh = 0
        if fix & CheckFix.LEAKS:
            c2.res = CheckResult()
            c2.msg = c2.res.messages.append
            highest = await c2.compare(CheckFix.LEAKS)
            res.messages.extend(c2.res.messages)
            if c2.rebuild:
                res.messages.append("ERROR rebuilt refcount structure is still broken")
            fresh = c2.res.leaks
        if res.corruptions < old.corruptions:
            res.corruptions_fixed += old.corruptions - res.corruptions
        if res.leaks < old.leaks:
            res.leaks_fixed += old.leaks - res.leaks
        res.leaks += fresh
    elif fix:
        if c.rebuild:
            res.messages.append("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            err = BlockIOError(errno.EIO, op="check", detail="need to rebuild refcount structures")
            err.check_messages = list(res.messages)  # type: ignore[attr-defined]  # printed before the failure
            raise err
        if res.leaks or res.corruptions:
            _restore(res, pre)
            highest = await c.compare(fix)
    await img.rc.flush()
    await c.check_copied(fix)
    res.image_end_offset = (highest + 1) * img.cs


def _copy(res: CheckResult) -> CheckResult:
    return CheckResult(res.corruptions, res.leaks, res.check_errors, res.corruptions_fixed, res.leaks_fixed)


def _restore(res: CheckResult, saved: CheckResult) -> None:
    res.corruptions, res.leaks, res.check_errors = saved.corruptions, saved.leaks, saved.check_errors
    res.corruptions_fixed, res.leaks_fixed = saved.corruptions_fixed, saved.leaks_fixed


async def check_snapshots_and_refcounts(drv: Any, res: CheckResult, fix: CheckFix) -> None:
    """The snapshot table read (and its repairs), the refcounts, then the table rewritten, as QEMU orders them."""
    from .snapshot_check import add_result, check_fix_snapshot_table, check_read_snapshot_table

    snap = CheckResult(messages=res.messages)  # one list of lines, in the order QEMU prints them
    await check_read_snapshot_table(drv, snap, fix)
    await check_refcounts(drv, res, fix)
    await check_fix_snapshot_table(drv, snap, fix)
    add_result(res, snap)


async def check(drv: Any, fix: CheckFix) -> CheckResult:
    """The driver's ``check`` hook (QEMU's qcow2_co_check_locked)."""
    img = drv.img
    res = CheckResult()
    if fix and getattr(drv, "read_only", False):
        raise BlockGraphError("cannot repair a read-only image")
    if not getattr(drv, "read_only", True):
        await img.flush_metadata()
        await img.file.flush()
    with img.rc.collecting_freed() as freed:
        await check_snapshots_and_refcounts(drv, res, fix)
    if fix:
        await img.flush_metadata()
        await img.file.flush()
        await img.discard_free(freed)  # repaired leaks: always discarded, as QEMU's QCOW2_DISCARD_ALWAYS
    if fix and not res.check_errors and not res.corruptions:
        if img.dirty_set or img.h.dirty:
            img.dirty_set = True
            await img.clear_dirty()
        if img.h.incompatible_features & INCOMPAT_CORRUPT:
            img.h.incompatible_features &= ~INCOMPAT_CORRUPT
            await img.file.pwritev(72, memoryview(struct.pack(">Q", img.h.incompatible_features)))
            await img.file.flush()
    return res


async def repair_on_open(drv: Any) -> None:
    """A dirty image (lazy refcounts, not closed cleanly) opened read-write: repair everything, as QEMU."""
    from blockgraph.errors import OpenError

    res = await check(drv, CheckFix.LEAKS | CheckFix.ERRORS)
    warn = getattr(getattr(getattr(drv, "node", None), "graph_node", None), "session", None)
    for line in res.messages:
        if warn is not None:
            warn.warn(line)
    if res.check_errors:
        raise OpenError("Could not repair dirty image")


class CheckMixin:
    async def check(self, fix: CheckFix) -> CheckResult:
        lock = getattr(self, "meta_lock", None)
        if lock is None:
            return await check(self, fix)
        async with lock:
            return await check(self, fix)
