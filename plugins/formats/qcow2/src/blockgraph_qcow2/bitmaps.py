"""Persistent dirty bitmaps: read the bitmaps extension (docs/interop/qcow2.txt "Bitmaps extension") into
core bitmaps at open, as qcow2_load_dirty_bitmaps does.

What is read: the directory entries (name, granularity, flags) and, for a bitmap that is not ``in_use``,
its bitmap table and data clusters. A bitmap marked ``in_use`` was not saved cleanly: it is loaded as
inconsistent (its data is not read) and the core refuses to use it with QEMU's text. Bitmaps without the
``auto`` flag are loaded disabled; on a read-only node every bitmap is read-only.

On a read-write open the bitmaps are marked ``in_use`` on disk first, as QEMU does, so a crash leaves them
inconsistent, never wrong. At close each one is written back into its table (existing data clusters reused,
a new one allocated where a cluster of bits stops being all zeros or all ones) and its ``in_use`` flag
cleared. When bitmaps were removed, resized or made persistent while open (QMP's block-dirty-bitmap-add,
``img bitmap --add``), a new directory listing the remaining and the new ones is written and the header
switched to it (see :func:`store`); a write failure leaves the bitmaps ``in_use``: inconsistent, never wrong.
A removed bitmap's clusters are freed; for an inconsistent one only those nothing else references.
"""

from __future__ import annotations

import struct
from typing import Any

from blockgraph import bitmaps as core_bitmaps
from blockgraph.driver import CheckFix, CheckResult
from blockgraph.errors import BlockIOError, ImageCorrupt, OpenError

from .constants import AUTOCLEAR_BITMAPS, EXT_BITMAPS
from .header import Header

MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_TABLE_SIZE = 0x8000000
MAX_PHYS_SIZE = 0x20000000
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
FLAG_IN_USE, FLAG_AUTO = 1 << 0, 1 << 1
RESERVED_FLAGS = 0xFFFFFFFC
ENTRY_RESERVED_MASK = 0xFF000000000001FE
ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
ENTRY_ALL_ONES = 1
_ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, type, granularity bits, name size, extra


class DirEntry:
    """One bitmap directory entry as stored."""

    __slots__ = ("flags", "granularity_bits", "name", "pos", "table_offset", "table_size")

    def __init__(self, name: str, table_offset: int, table_size: int, flags: int, granularity_bits: int,
                 pos: int = 0) -> None:
        self.name, self.table_offset, self.table_size = name, table_offset, table_size
        self.flags, self.granularity_bits, self.pos = flags, granularity_bits, pos


class Stored:
    """A bitmap of the image's directory and the core bitmap it was loaded into (``table`` is None for an
    inconsistent one, whose data was not read)."""

    __slots__ = ("bm", "entry", "flags_at", "size", "table")

    def __init__(self, entry: DirEntry, table: list[int] | None, bm: core_bitmaps.DirtyBitmap, flags_at: int,
                 size: int) -> None:
        self.entry, self.table, self.bm, self.flags_at, self.size = entry, table, bm, flags_at, size


def extension(h: Header) -> tuple[int, int, int] | None:
    """(nb_bitmaps, directory_size, directory_offset) when the extension is present and consistent."""
    e = h.ext(EXT_BITMAPS)
    if e is None:
        return None
    if len(e.data) != 24:
        raise OpenError("bitmaps_ext: Invalid extension length")
    nb, reserved, size, offset = struct.unpack(">IIQQ", e.data)
    if reserved:
        raise OpenError("bitmaps_ext: Reserved field is not zero")
    if not h.autoclear_features & AUTOCLEAR_BITMAPS:
        return None  # written by a program that did not maintain them: ignored, as QEMU does
    if nb > MAX_BITMAPS:
        raise OpenError(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum of "
                        f"{MAX_BITMAPS}")
    if nb == 0:
        raise OpenError("found bitmaps extension with zero bitmaps")
    if offset % h.cluster_size:
        raise OpenError("bitmaps_ext: invalid bitmap directory offset")
    if size > MAX_DIRECTORY_SIZE:
        raise OpenError(f"bitmaps_ext: bitmap directory size ({size}) exceeds the maximum supported size "
                        f"({MAX_DIRECTORY_SIZE})")
    return nb, size, offset


def _entry_ok(e: DirEntry, typ: int, cluster_size: int, length: int) -> bool:
    """check_dir_entry: the constraints a usable entry satisfies."""
    if (not e.table_size or not e.table_offset or e.table_offset % cluster_size or e.table_size > MAX_TABLE_SIZE
            or not MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS
            or e.flags & RESERVED_FLAGS or typ != 1):
        return False
    phys = e.table_size * cluster_size
    if phys > MAX_PHYS_SIZE:
        return False
    return bool(e.flags & FLAG_IN_USE) or length <= (phys * 8) << e.granularity_bits


def parse_directory(d: bytes, nb: int, cluster_size: int, length: int) -> list[DirEntry]:
    """The entries of directory bytes ``d``, validated (bitmap_list_load's checks and texts)."""
    out: list[DirEntry] = []
    pos = 0
    while pos < len(d):
        if pos + _ENTRY.size > len(d):
            raise OpenError("Broken bitmap directory")
        if len(out) + 1 > nb:
            raise OpenError("More bitmaps found than specified in header extension")
        toff, tsize, flags, typ, gbits, name_size, extra = _ENTRY.unpack_from(d, pos)
        step = -(-(_ENTRY.size + name_size + extra) // 8) * 8
        if pos + step > len(d):
            raise OpenError("Broken bitmap directory")
        if extra:
            raise OpenError("Bitmap extra data is not supported")
        raw = d[pos + _ENTRY.size:pos + _ENTRY.size + name_size]
        name = raw.decode("utf-8", "replace")
        e = DirEntry(name, toff, tsize, flags, gbits, pos)
        if name_size > core_bitmaps.MAX_NAME_SIZE or not _entry_ok(e, typ, cluster_size, length):
            raise OpenError(f"Bitmap '{name}' doesn't satisfy the constraints")
        out.append(e)
        pos += step
    if len(out) != nb:
        raise OpenError("Less bitmaps found than specified in header extension")
    return out


async def read_directory(file: Any, h: Header) -> list[DirEntry]:
    ext = extension(h)
    if ext is None:
        return []
    nb, size, offset = ext
    if size == 0:
        raise OpenError("Requested bitmap directory size is zero")
    if offset + size > file.getlength():
        raise OpenError("Broken bitmap directory")
    buf = bytearray(size)
    await file.preadv(offset, memoryview(buf))
    return parse_directory(bytes(buf), nb, h.cluster_size, h.size)


async def _load_data(file: Any, e: DirEntry, bm: core_bitmaps.DirtyBitmap, cluster_size: int) -> list[int]:
    """Fill ``bm`` from the bitmap table: each entry covers one cluster of bits (all zeros, all ones, or data)."""
    need = -(-len(bm.bits) // cluster_size) if bm.bits else 0
    # QEMU serialises whole 64-bit words; the table size must match what that needs.
    words = -(-bm.granules // 64) * 8
    if -(-words // cluster_size) != e.table_size or need > e.table_size:
        raise OpenError(f"Could not read bitmap '{e.name}' from image: Invalid argument")
    if e.table_offset + e.table_size * 8 > file.getlength():
        raise OpenError(f"Could not read bitmap_table table from image for bitmap '{e.name}': Invalid argument")
    raw = bytearray(e.table_size * 8)
    await file.preadv(e.table_offset, memoryview(raw))
    table = struct.unpack(f">{e.table_size}Q", raw)
    for entry in table:
        off = entry & ENTRY_OFFSET_MASK
        if entry & ENTRY_RESERVED_MASK or (off and (entry & ENTRY_ALL_ONES or off % cluster_size)):
            raise OpenError(f"Could not read bitmap_table table from image for bitmap '{e.name}': "
                            f"Invalid argument")
    bits = bm.bits
    flen = file.getlength()
    for i, entry in enumerate(table):
        lo = i * cluster_size
        if lo >= len(bits):
            break
        hi = min(lo + cluster_size, len(bits))
        off = entry & ENTRY_OFFSET_MASK
        if off:
            if off + cluster_size > flen:
                raise OpenError(f"Could not read bitmap '{e.name}' from image: Input/output error")
            await file.preadv(off, memoryview(bits)[lo:hi])
        elif entry & ENTRY_ALL_ONES:
            bits[lo:hi] = b"\xff" * (hi - lo)
    tail = bm.granules & 7
    if tail and bits:
        bits[-1] &= (1 << tail) - 1  # bits past the end are not part of the bitmap
    return list(table)


async def load(driver: Any, h: Header) -> int:
    """Create the image's persistent bitmaps on the driver's node (called from the driver's open).

    Returns the autoclear bit to keep: AUTOCLEAR_BITMAPS when this open maintains the bitmaps directory.
    """
    driver.qcow2_bitmaps = []
    entries = await read_directory(driver.file, h)
    if not entries:
        return 0
    node = driver.node.graph_node
    dir_offset = extension(h)[2]  # type: ignore[index]
    created = []
    stored: list[Stored] = []
    try:
        for e in entries:
            bm = core_bitmaps.DirtyBitmap(e.name, 1 << e.granularity_bits, h.size, persistent=True,
                                          enabled=bool(e.flags & FLAG_AUTO))
            if core_bitmaps.find(node, e.name) is not None:
                raise OpenError(f"Bitmap already exists: {e.name}")
            table = None
            if e.flags & FLAG_IN_USE:
                bm.inconsistent, bm.enabled = True, False  # not saved cleanly: its data is not read
            else:
                table = await _load_data(driver.file, e, bm, h.cluster_size)
            stored.append(Stored(e, table, bm, dir_offset + e.pos + 12, h.size))
            bm.readonly = driver.read_only
            node.dirty_bitmaps.insert(0, bm)
            created.append(bm)
        if driver.read_only:
            driver.qcow2_bitmaps = stored  # for info(); nothing is written back
            return 0
        consistent = [st for st in stored if st.table is not None]
        ranges = [(dir_offset, extension(h)[1])]  # type: ignore[index]
        for st in consistent:
            ranges.append((st.entry.table_offset, st.entry.table_size * 8))
            ranges += [(e & ENTRY_OFFSET_MASK, h.cluster_size) for e in st.table or () if e & ENTRY_OFFSET_MASK]
        if consistent and not await _owned(driver, ranges):
            # Metadata shared with something else (a corrupt image): never written in place. The bitmaps
            # stay usable in memory; the autoclear bit is dropped as by a program without bitmap support.
            for bm in created:
                bm.persistent = False
            return 0
        if consistent:
            await _mark_in_use(driver.file, h, consistent)
    except BaseException:
        for bm in created:
            node.dirty_bitmaps.remove(bm)
        raise
    driver.qcow2_bitmaps = stored
    return AUTOCLEAR_BITMAPS


def info(driver: Any) -> dict[str, Any]:
    """``bitmaps`` of qemu-img info's format-specific data: the directory as it is on disk."""
    out = []
    for st in getattr(driver, "qcow2_bitmaps", None) or []:
        flags = [name for bit, name in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto")) if st.entry.flags & bit]
        out.append({"flags": flags, "name": st.entry.name, "granularity": 1 << st.entry.granularity_bits})
    return {"bitmaps": out} if out else {}


async def _owned(driver: Any, ranges: list[tuple[int, int]]) -> bool:
    """Every cluster the bitmaps would rewrite in place is referenced once, by the bitmaps alone: counted as
    ``qemu-img check`` counts (L1/L2 of the image and its snapshots, refcount structures, bitmaps) and with
    refcount 1 on disk. One pass over the metadata, paid only when an image with bitmaps is opened read-write."""
    from .check import Checker

    img = driver.img
    checker = Checker(driver, CheckResult())
    await checker.calculate(CheckFix.NONE)
    refs, cbits = checker.refs, img.h.cluster_bits
    for offset, length in ranges:
        if offset < img.h.cluster_size or offset + length > img.file.getlength():
            return False
        for c in range(offset >> cbits, ((offset + length - 1) >> cbits) + 1):
            if c >= len(refs) or refs[c] != 1 or await img.rc.get(c) != 1:
                return False
    return True


async def _write_autoclear(file: Any, value: int) -> None:
    await file.pwritev(88, memoryview(struct.pack(">Q", value)))
    await file.flush()


async def _mark_in_use(file: Any, h: Header, stored: list[Stored]) -> None:
    """QEMU's update in place: drop the autoclear bit, rewrite the flags, set the bit again (each synced)."""
    await _write_autoclear(file, h.autoclear_features & ~AUTOCLEAR_BITMAPS)
    for st in stored:
        st.entry.flags |= FLAG_IN_USE
        await file.pwritev(st.flags_at, memoryview(struct.pack(">I", st.entry.flags)))
    await file.flush()
    await _write_autoclear(file, h.autoclear_features)


async def _new_table(img: Any, st: Stored, cluster_size: int) -> list[int]:
    """The table for the bitmap's current bits: a cluster of all zeros (or all ones) needs no data, any other
    one gets a data cluster (newly allocated when the entry had none) and is written there."""
    bits = st.bm.bits
    per = cluster_size * 8  # granules per table entry
    table = list(st.table)
    for i, entry in enumerate(table):
        chunk = bytes(bits[i * cluster_size:(i + 1) * cluster_size])
        off = entry & ENTRY_OFFSET_MASK
        if not off:
            n = max(0, min(per, st.bm.granules - i * per))
            value = int.from_bytes(chunk, "little")
            if value == 0 or (n and value == (1 << n) - 1):
                table[i] = ENTRY_ALL_ONES if value else 0
                continue
            off = table[i] = await img.rc.alloc_clusters(1)
        await img.file.pwritev(off, memoryview(chunk + bytes(cluster_size - len(chunk))))
    return table


def _entry_bytes(st: Stored, flags: int) -> bytes:
    name = st.entry.name.encode()
    raw = _ENTRY.pack(st.entry.table_offset, st.entry.table_size, flags, 1, st.entry.granularity_bits, len(name),
                      0) + name
    return raw + bytes(-len(raw) % 8)


def _final_flags(st: Stored) -> int:
    if st.table is None:
        return st.entry.flags  # still in use: inconsistent
    return (st.entry.flags & ~(FLAG_IN_USE | FLAG_AUTO)) | (FLAG_AUTO if st.bm.enabled else 0)


def _table_size(bm: core_bitmaps.DirtyBitmap, cs: int) -> int:
    """Table entries QEMU expects: clusters of the bitmap serialised in whole 64-bit words."""
    return max(1, -(-(-(-bm.granules // 64) * 8) // cs))


async def _new_stored(img: Any, bm: core_bitmaps.DirtyBitmap, size: int, cs: int) -> Stored:
    """A directory entry and an empty table (allocated) for a bitmap made persistent in this session."""
    table_size = _table_size(bm, cs)
    toff = await img.rc.alloc_clusters(-(-(table_size * 8) // cs))
    entry = DirEntry(bm.name or "", toff, table_size, 0, bm.shift)
    return Stored(entry, [0] * table_size, bm, 0, size)


async def _free_bitmap(img: Any, st: Stored, cs: int) -> None:
    """Drop the clusters of a removed bitmap (its table as read from the image when it was inconsistent)."""
    table = st.table
    if table is None:
        return
    for entry in table:
        off = entry & ENTRY_OFFSET_MASK
        if off and not entry & ENTRY_RESERVED_MASK and not off % cs:
            await img.rc.update(off, cs, -1)
    await img.rc.update(st.entry.table_offset, -(-(st.entry.table_size * 8) // cs) * cs, -1)


async def store(driver: Any) -> None:
    """Write the bitmaps back and clear their in_use flags (called from the driver's close).

    Unchanged directory: data and tables in place, then the flags. Bitmaps removed or made persistent in
    this session: a new directory in new clusters, the header switched to it, then the old clusters freed
    (qcow2_store_persistent_dirty_bitmaps' order).
    """
    stored: list[Stored] = getattr(driver, "qcow2_bitmaps", None) or []
    if driver.read_only:
        return
    img, file, cs = driver.img, driver.file, driver.cluster_size
    node = driver.node.graph_node
    present = {id(bm) for bm in node.dirty_bitmaps}
    known = {id(st.bm) for st in stored}
    kept = [st for st in stored if id(st.bm) in present and st.bm.persistent]
    removed = [st for st in stored if st not in kept]
    new_bms = [bm for bm in node.dirty_bitmaps if bm.persistent and id(bm) not in known and not bm.inconsistent]
    if not stored and not new_bms:
        return
    try:
        new = [await _new_stored(img, bm, img.h.size, cs) for bm in new_bms]
        fresh = list(new)  # tables in new clusters: written whole, and the directory is rewritten
        done = []
        for st in kept + new:
            if st.table is None:
                continue
            if st.bm.size != img.h.size:
                st.bm.resize(img.h.size)  # the image was resized: new granules are clean
            need = _table_size(st.bm, cs)
            if need != st.entry.table_size:
                # Resized: a new table (data clusters kept where they still count); the old one is freed
                # once the new directory is in place.
                e = st.entry
                removed.append(Stored(DirEntry(e.name, e.table_offset, e.table_size, e.flags, e.granularity_bits),
                                      st.table[need:], st.bm, 0, 0))
                st.table = st.table[:need] + [0] * (need - len(st.table))
                e.table_offset, e.table_size = await img.rc.alloc_clusters(-(-(need * 8) // cs)), need
                fresh.append(st)
            done.append((st, await _new_table(img, st, cs)))
        # Data and the refcounts of new clusters reach the disk before a table points at them, and the
        # tables before the flag (or the directory) that vouches for them.
        await img.rc.flush()
        await file.flush()
        for st, table in done:
            if table != st.table or st in fresh:
                await file.pwritev(st.entry.table_offset, memoryview(struct.pack(f">{len(table)}Q", *table)))
            st.table = table
        await file.flush()
        if not removed and not fresh:
            for st, _ in done:
                await file.pwritev(st.flags_at, memoryview(struct.pack(">I", _final_flags(st))))
            await file.flush()
            return
        await _switch_directory(driver, kept + new, removed)
    except (BlockIOError, ImageCorrupt):
        pass  # the bitmaps stay in_use: inconsistent, never wrong
    finally:
        driver.qcow2_bitmaps = []


async def _switch_directory(driver: Any, entries: list[Stored], removed: list[Stored]) -> None:
    img, file, cs = driver.img, driver.file, driver.cluster_size
    h = img.h
    old = extension(h) if h.autoclear_features & AUTOCLEAR_BITMAPS else None
    if entries:
        d = b"".join(_entry_bytes(st, _final_flags(st)) for st in entries)
        doff = await img.rc.alloc_clusters(-(-len(d) // cs))
        await file.pwritev(doff, memoryview(d))
        await img.rc.flush()
        await file.flush()
        h.set_ext(EXT_BITMAPS, struct.pack(">IIQQ", len(entries), 0, len(d), doff))
        h.autoclear_features |= AUTOCLEAR_BITMAPS
    else:
        h.set_ext(EXT_BITMAPS, None)
        h.autoclear_features &= ~AUTOCLEAR_BITMAPS
    await img.write_header()
    await file.flush()
    if old is not None:
        await img.rc.update(old[2], -(-old[1] // cs) * cs, -1)
    for st in removed:
        if st.table is None:
            await _free_unreferenced(driver, st.entry)
        else:
            await _free_bitmap(img, st, cs)
    await img.rc.flush()
    await file.flush()


async def _free_unreferenced(driver: Any, e: DirEntry) -> None:
    """A removed inconsistent bitmap: its table was never validated, so only the clusters it names that
    nothing on disk references any more (counted as ``qemu-img check`` counts) and whose refcount is 1 are
    freed. QEMU frees them as well; a damaged table can thus never free guest data."""
    from .check import Checker

    img, cs = driver.img, driver.cluster_size
    if e.table_offset % cs or e.table_offset < cs or e.table_offset + e.table_size * 8 > img.file.getlength():
        return
    raw = bytearray(e.table_size * 8)
    await img.file.preadv(e.table_offset, memoryview(raw))
    clusters = {off >> img.cbits for entry in struct.unpack(f">{e.table_size}Q", raw)
                if (off := entry & ENTRY_OFFSET_MASK) and not off % cs}
    last = (e.table_offset + max(1, e.table_size * 8) - 1) >> img.cbits
    clusters |= set(range(e.table_offset >> img.cbits, last + 1))
    await img.rc.flush()
    checker = Checker(driver, CheckResult())
    await checker.calculate(CheckFix.NONE)
    refs = checker.refs
    for c in sorted(clusters):
        if (c >= len(refs) or refs[c] == 0) and c < img.file.getlength() >> img.cbits and await img.rc.get(c) == 1:
            await img.rc.update(c << img.cbits, cs, -1)


def can_store_new(driver: Any, name: str, granularity: int) -> None:
    """qcow2_co_can_store_new_dirty_bitmap: refuse with QEMU's text, prefixed as QEMU prefixes it."""
    h = driver.img.h
    reason = None
    gbits = granularity.bit_length() - 1
    granules = -(-h.size // granularity)
    stored = getattr(driver, "qcow2_bitmaps", None) or []
    if h.version < 3:
        reason = "Cannot store dirty bitmaps in qcow2 v2 files"
    elif gbits > MAX_GRANULARITY_BITS:
        reason = f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)"
    elif gbits < MIN_GRANULARITY_BITS:
        reason = f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)"
    elif -(-granules // 8) > min(MAX_PHYS_SIZE, MAX_TABLE_SIZE * h.cluster_size):
        reason = "Too much space will be occupied by the bitmap. Use larger granularity"
    elif len(name.encode()) > core_bitmaps.MAX_NAME_SIZE:
        reason = f"Name length exceeds maximum ({core_bitmaps.MAX_NAME_SIZE} characters)"
    elif len(stored) >= MAX_BITMAPS:
        reason = "Maximum number of persistent bitmaps is already reached"
    if reason is not None:
        raise core_bitmaps.BitmapError(f"Can't make bitmap '{name}' persistent in '{driver.node.node_name}': "
                                       f"{reason}")
