"""``img amend`` for qcow2, and the other in-place header changes (QEMU's qcow2_amend_options & co).

* ``compat``: 0.10 -> 1.1 rewrites the snapshot table with its extra data, then the header; 1.1 -> 0.10
  (last, as QEMU) refuses what v2 cannot express (refcount widths but 16, a data file, snapshots with a
  different disk size or a >4 GiB vm state, other incompatible features), turns zero clusters into
  unallocated ones (or zeroed data clusters over a backing file), then writes a v2 header;
* ``lazy_refcounts``: on needs v3; off writes everything back and clears the dirty bit first;
* ``refcount_bits``: the refcounts are recounted from the metadata and a new refcount structure of the new
  width is written; the header switches width and table in one write; the old structure is then freed;
* ``size`` resizes; ``backing_file``/``backing_fmt`` may only restate the current values; ``data_file`` only
  renames an existing external data file; ``data_file_raw`` cannot be turned on.

``change_backing_file`` (rebase) and ``make_empty`` (commit) live here too.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar

from blockgraph.driver import CheckFix, CheckResult, PreallocMode
from blockgraph.errors import BlockGraphError, BlockIOError, OpenError
from blockgraph.options import parse_bool, parse_size

from .constants import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_DATA_FILE,
    EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DIRTY,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
)
from .image import L2Slice

AMEND_OPTIONS = ("backing_file", "backing_fmt", "compat", "data_file", "data_file_raw", "encrypt.iter-time",
                 "lazy_refcounts", "refcount_bits", "size")


async def write_header(img: Any) -> None:
    try:
        data = img.h.pack()
    except OpenError:
        raise BlockIOError(errno.ENOSPC, op="amend", detail="No space left in the file header") from None
    await img.flush_metadata()
    await img.file.flush()
    await img.file.pwritev(0, memoryview(data))
    await img.file.flush()


async def upgrade(drv: Any) -> None:
    from .header import feature_table

    img = drv.img
    if any(sn.extra_data_size < 16 for sn in drv.snapshots):
        for sn in drv.snapshots:
            sn.extra_data_size = max(sn.extra_data_size, 24)
        await drv._write_table(list(drv.snapshots))
    img.h.version = 3
    img.h.header_length = max(img.h.header_length, 112)
    if img.h.ext(EXT_FEATURE_TABLE) is None:
        img.h.set_ext(EXT_FEATURE_TABLE, feature_table())
    await write_header(img)


async def downgrade(drv: Any) -> None:
    img = drv.img
    h = img.h
    if h.refcount_order != 4:
        raise BlockGraphError("compat=0.10 requires refcount_bits=16")
    if img.has_data_file:
        raise BlockGraphError("Cannot downgrade an image with a data file")
    if any(sn.vm_state_size > 0xFFFFFFFF or sn.disk_size != h.size for sn in drv.snapshots):
        raise BlockGraphError("Internal snapshots prevent downgrade of image")
    if h.incompatible_features & INCOMPAT_DIRTY:
        img.dirty_set = True
        await img.clear_dirty()
    other = h.incompatible_features & ~INCOMPAT_COMPRESSION
    if other:
        raise BlockGraphError(f"Cannot downgrade an image with incompatible features 0x{other:x} set")
    h.compatible_features = h.autoclear_features = 0
    img.lazy = False
    await expand_zero_clusters(drv)
    if h.incompatible_features & INCOMPAT_COMPRESSION:
        if await has_compressed_clusters(drv):
            raise BlockGraphError("Cannot downgrade an image with zstd compression type and existing compressed "
                                  "clusters")
        h.incompatible_features &= ~INCOMPAT_COMPRESSION
        h.compression_type = 0
    h.version = 2
    h.header_length = 72
    h.extra_fields = b""
    for typ in (EXT_FEATURE_TABLE, EXT_BITMAPS):
        h.set_ext(typ, None)
    await write_header(img)


async def _all_l1s(drv: Any) -> list[tuple[int, list[int]]]:
    from .snapshot import read_l1

    img = drv.img
    out = [(-1, img.l1)]
    for sn in drv.snapshots:
        out.append((sn.l1_table_offset, await read_l1(img, sn.l1_table_offset, sn.l1_size)))
    return out


async def has_compressed_clusters(drv: Any) -> bool:
    img = drv.img
    for _, l1 in await _all_l1s(drv):
        for e in l1:
            if e & L1E_OFFSET_MASK:
                async for t in img.l2_slices(e & L1E_OFFSET_MASK):
                    if any(img.l2_get(t, i)[0] & OFLAG_COMPRESSED for i in img.slice_range(t)):
                        return True
    return False


async def expand_zero_clusters(drv: Any) -> None:
    """v2 has no zero flag: plain zero clusters become unallocated (or zeroed data over a backing file),
    preallocated ones become data clusters holding zeros (QEMU's qcow2_expand_zero_clusters)."""
    img = drv.img
    cs = img.cs
    zeros = memoryview(bytes(cs))
    seen: set[int] = set()
    for _, l1 in await _all_l1s(drv):
        for e in l1:
            l2_off = e & L1E_OFFSET_MASK
            if not l2_off or l2_off in seen:
                continue
            seen.add(l2_off)
            l2_refs = await img.rc.get(l2_off >> img.cbits)
            async for table in img.l2_slices(l2_off):
                await _expand_in_slice(drv, table, l2_refs, zeros)
    await img.flush_metadata()


async def _expand_in_slice(drv: Any, table: L2Slice, l2_refs: int, zeros: memoryview) -> None:
    img = drv.img
    for i in img.slice_range(table):
        entry, bitmap = img.l2_get(table, i)
        if entry & OFLAG_COMPRESSED or not entry & OFLAG_ZERO:
            continue
        host = entry & L2E_OFFSET_MASK
        if not host:
            if drv.backing is None:
                img.l2_put(table, i, 0, bitmap)
                img.l2_cache.mark_dirty(table.off)
                continue
            host = await img.rc.alloc_clusters(1)
            if l2_refs > 1:
                await img.rc.update(host, 1, l2_refs - 1)
            await img.rc.flush()
        await img.file.pwritev(host, zeros)
        await img.file.flush()
        refs = await img.rc.get(host >> img.cbits)
        table = await img.read_l2(table.table_off, i)  # the same slice, read again if it left the cache
        img.l2_put(table, i, host | (OFLAG_COPIED if refs == 1 else 0), bitmap)
        img.l2_cache.mark_dirty(table.off)


async def change_refcount_bits(drv: Any, bits: int) -> None:
    """Recount every cluster, write a refcount structure ``bits`` wide, switch to it, free the old one."""
    from .check import Checker
    from .check_rebuild import rebuild_refcounts

    img = drv.img
    await img.flush_metadata()
    c = Checker(drv, CheckResult())
    await c.calculate(CheckFix.NONE)
    if c.res.corruptions or c.res.check_errors:
        raise BlockGraphError("Refcount structure is corrupt; repair it with 'qemu-img check -r all' first")
    limit = (1 << bits) - 1
    for i, r in enumerate(c.refs):
        if r > limit:
            raise BlockGraphError(f"Cannot decrease refcount entry width to {bits} bits: Cluster at offset "
                                  f"{i << img.cbits:#x} has a refcount of {r}")
    rc = img.rc
    order = bits.bit_length() - 1
    rc.order, rc.bits, rc.max_refcount, rc.entries = order, bits, limit, img.cs * 8 // bits
    img.h.refcount_order = order
    await rebuild_refcounts(img, c, header_order=True)
    fixer = Checker(drv, CheckResult())
    await fixer.calculate(CheckFix.NONE)
    await fixer.compare(CheckFix.LEAKS)
    await img.flush_metadata()
    await img.file.flush()


async def set_lazy(drv: Any, on: bool) -> None:
    img = drv.img
    h = img.h
    if on:
        if h.version < 3:
            raise BlockGraphError("Lazy refcounts only supported with compatibility level 1.1 and above (use "
                                  "compat=1.1 or greater)")
        h.compatible_features |= COMPAT_LAZY_REFCOUNTS
        await write_header(img)
        img.lazy = True
    else:
        if img.dirty_set or h.dirty:
            img.dirty_set = True
            await img.clear_dirty()
        h.compatible_features &= ~COMPAT_LAZY_REFCOUNTS
        await write_header(img)
        img.lazy = False


async def amend(drv: Any, values: dict[str, str], force: bool, warn: Any) -> None:
    img = drv.img
    h = img.h
    old_version = new_version = h.version
    if "compat" in values:
        versions = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
        if values["compat"] not in versions:
            raise BlockGraphError(f"Unknown compatibility level {values['compat']}")
        new_version = versions[values["compat"]]
    refcount_bits = h.refcount_bits
    if "refcount_bits" in values:
        refcount_bits = int(values["refcount_bits"])
        if refcount_bits <= 0 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
            raise BlockGraphError("Refcount width must be a power of two and may not exceed 64 bits")
    if "encrypt.iter-time" in values:
        raise BlockGraphError("Can't amend encryption options - encryption not present")
    if values.get("data_file") and not img.has_data_file:
        raise BlockGraphError("data-file can only be set for images that use an external data file")
    data_file_raw = h.data_file_raw
    if "data_file_raw" in values:
        data_file_raw = parse_bool(values["data_file_raw"])
        if data_file_raw and not h.data_file_raw:
            raise BlockGraphError("data-file-raw cannot be set on existing images")
    if new_version > old_version:
        await upgrade(drv)
    if refcount_bits != h.refcount_bits:
        if new_version < 3 and refcount_bits != 16:
            raise BlockGraphError("Refcount widths other than 16 bits require compatibility level 1.1 or above "
                                  "(use compat=1.1 or greater)")
        await change_refcount_bits(drv, refcount_bits)
    if data_file_raw:
        h.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW
    else:
        h.autoclear_features &= ~AUTOCLEAR_DATA_FILE_RAW
    if values.get("data_file") is not None:
        h.set_ext(EXT_DATA_FILE, values["data_file"].encode() or None)
    await write_header(img)
    if "backing_file" in values or "backing_fmt" in values:
        if values.get("backing_file") != h.backing_file or values.get("backing_fmt") != h.backing_format:
            raise BlockGraphError("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")
    lazy = parse_bool(values["lazy_refcounts"]) if "lazy_refcounts" in values else img.lazy
    if lazy != img.lazy:
        if lazy and new_version < 3:
            raise BlockGraphError("Lazy refcounts only supported with compatibility level 1.1 and above (use "
                                  "compat=1.1 or greater)")
        await set_lazy(drv, lazy)
    new_size = parse_size(values["size"]) if "size" in values else 0
    if new_size:
        await drv.truncate(new_size, True, PreallocMode.OFF)
        node = getattr(getattr(drv, "node", None), "graph_node", None)
        if node is not None:
            from blockgraph.io import sector_length

            node.length = sector_length(h.size)
    if new_version < old_version:
        await downgrade(drv)


class AmendMixin:
    amend_options: ClassVar[tuple[str, ...]] = AMEND_OPTIONS

    async def amend(self, values: dict[str, str], force: bool, warn: Any) -> None:
        await amend(self, values, force, warn)

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        img = self.img  # type: ignore[attr-defined]
        h = img.h
        if name and len(name.encode()) > 1023:
            raise BlockIOError(errno.EINVAL, op="change_backing_file", detail="Backing file name too long")
        if fmt and not name:
            raise BlockIOError(errno.EINVAL, op="change_backing_file")
        h.backing_file = name or None
        h.set_ext(EXT_BACKING_FORMAT, fmt.encode() if fmt else None)
        if not name:
            h.backing_file_offset = h.backing_file_size = 0
        await write_header(img)

    # Reopen (read-only <-> read-write, as commit does to its base); the file child is reopened by the core.
    async def reopen_prepare(self, options: Any, read_only: bool) -> None:
        img = self.img  # type: ignore[attr-defined]
        if read_only and not getattr(self, "read_only", True):
            await img.flush_metadata()
            if img.dirty_set:
                await img.clear_dirty()
        self._reopen_to = (options, read_only)

    async def reopen_commit(self) -> None:
        options, self.read_only = self._reopen_to
        if options is not None:
            self.options = options

    async def reopen_abort(self) -> None:
        self._reopen_to = None

    async def make_empty(self) -> None:
        """Drop every cluster of the active layer (qemu-img commit empties the top this way)."""
        await self.discard_range_full(0, self.img.h.size)  # type: ignore[attr-defined]
        await self.img.flush_metadata()  # type: ignore[attr-defined]
