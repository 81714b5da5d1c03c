"""The vpc (VHD) format: fixed, dynamic and differencing disks.

Dynamic and differencing disks map the disk in blocks (2 MiB by default) through the
BAT; each allocated block starts with a sector bitmap telling which of its sectors are
present. Unset sectors read as zeros in a dynamic disk and from the parent in a
differencing disk. Fixed disks are the raw data followed by the footer.
"""

from __future__ import annotations

import errno
import uuid
from array import array
from collections import OrderedDict
from typing import Any, ClassVar

import attrs
from blockgraph.driver import BlockStatus, DriverKind, ReqFlags, Status
from blockgraph.errors import BlockGraphError, BlockIOError, ImageCorrupt, NotSupported, OpenError
from blockgraph.io import block_chunks
from blockgraph.options import one_of, opt, parse_bool, parse_size
from blockgraph.perms import ChildRole

from . import format as fmt
from .format import SECTOR, UNALLOCATED

TRUNCATED = "block-vpc: free_data_block_offset points after the end of file. The image has been truncated."
BITMAP_CACHE = 64  # block bitmaps kept in memory (512 bytes each for 2 MiB blocks)


def _size_calc(value: Any) -> str | None:
    if value is None:
        return None
    if value not in ("chs", "current_size"):
        raise ValueError(f"Invalid size calculation mode: '{value}'")  # QEMU's text
    return str(value)


@attrs.frozen(kw_only=True)
class VpcOptions:
    force_size_calc: str | None = opt(None, key="force_size_calc", converter=_size_calc,
                                      help="Force disk size calculation to use either CHS geometry, or use the "
                                           "disk current_size specified in the VHD footer. {chs, current_size}")


@attrs.frozen(kw_only=True)
class VpcCreateOptions:
    size: int = opt(converter=parse_size, help="Virtual disk size")
    subformat: str = opt("dynamic", converter=one_of("dynamic", "fixed"),
                         help="Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} ")
    force_size: bool = opt(False, converter=parse_bool,
                           help="Force disk size calculation to use the actual size specified, rather than using "
                                "the nearest CHS-based calculation")


def _bits(bitmap: bytearray | bytes, first: int, count: int) -> tuple[bool, int]:
    """Whether sector ``first`` is present, and how many sectors from it (at most ``count``) share that state."""
    state = bool(bitmap[first >> 3] & (0x80 >> (first & 7)))
    whole = 0xFF if state else 0
    n = 1
    while n < count:
        s = first + n
        if (s & 7) == 0 and n + 8 <= count and bitmap[s >> 3] == whole:
            n += 8
            continue
        if bool(bitmap[s >> 3] & (0x80 >> (s & 7))) != state:
            break
        n += 1
    return state, n


def _set_bits(bitmap: bytearray, first: int, count: int) -> bool:
    """Mark sectors present (whole bytes at once); True when anything changed."""
    changed = False
    s, end = first, first + count
    while s < end and (s & 7 or end - s < 8):
        mask = 0x80 >> (s & 7)
        if not bitmap[s >> 3] & mask:
            bitmap[s >> 3] |= mask
            changed = True
        s += 1
    lo, hi = s >> 3, end >> 3
    if hi > lo:
        full = b"\xff" * (hi - lo)
        if bitmap[lo:hi] != full:
            bitmap[lo:hi] = full
            changed = True
        s = hi << 3
    while s < end:
        mask = 0x80 >> (s & 7)
        if not bitmap[s >> 3] & mask:
            bitmap[s >> 3] |= mask
            changed = True
        s += 1
    return changed


class VpcDriver:
    name: ClassVar[str] = "vpc"
    aliases: ClassVar[tuple[str, ...]] = ("vhd",)
    kind: ClassVar[DriverKind] = DriverKind.FORMAT
    api_version: ClassVar[int] = 1
    child_options: ClassVar[tuple[str, ...]] = ("file", "backing")
    Options: ClassVar[type] = VpcOptions
    CreateOptions: ClassVar[type] = VpcCreateOptions
    create_qapi_enums: ClassVar[bool] = True  # "Parameter 'subformat' does not accept value 'x'"

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        from .probe import probe

        return probe(header, filename)

    # ------------------------------------------------------------ open

    async def open(self, node: Any, options: VpcOptions) -> None:
        self.node = node
        self.file = await node.open_child("file", ChildRole.IMAGE)
        self.bitmaps: OrderedDict[int, bytearray] = OrderedDict()
        self.backing_name: str | None = None
        self.references: list[tuple[str, str]] = []
        file_len = self.file.getlength()
        raw = await self._read_meta(0, fmt.FOOTER_SIZE, "footer") if file_len >= fmt.FOOTER_SIZE else b""
        if raw[:8] != fmt.COOKIE:
            if file_len < fmt.FOOTER_SIZE:
                raise OpenError(f"Invalid argument (a file of {file_len} bytes is too short for a VHD footer)")
            self.footer_at = file_len - fmt.FOOTER_SIZE
            raw = await self._read_meta(self.footer_at, fmt.FOOTER_SIZE, "footer")
            if raw[:8] != fmt.COOKIE:
                raise OpenError("invalid VPC image")
            self.fixed = True
        else:
            self.fixed = False
        footer = fmt.Footer.parse(raw)
        if not footer.stored_checksum_ok(raw):
            raise OpenError("Incorrect header checksum")
        self.footer = footer
        self.footer_raw = raw
        sectors = fmt.virtual_sectors(footer, options.force_size_calc)
        if sectors > fmt.MAX_SECTORS:
            raise OpenError(f"File too large (the VHD footer gives {sectors} sectors, more than 2040 GiB)")
        self.size = sectors * SECTOR
        node.set_limits(request_alignment=SECTOR)
        if self.fixed:
            if self.size > self.footer_at:
                raise ImageCorrupt(f"fixed VHD of {self.size} bytes, but only {self.footer_at} bytes of data "
                                   "precede the footer (the image has been truncated)",
                                   node=self._where(), offset=self.footer_at)
            return
        await self._open_dynamic(file_len)
        if footer.disk_type == fmt.TYPE_DIFFERENCING:
            await self._open_parent()

    def _where(self) -> str | None:
        """The node name for error messages, only when the user gave it."""
        return None if self.node.graph_node.generated_name else self.node.node_name

    async def _read_meta(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or offset + length > self.file.getlength():
            raise ImageCorrupt(f"{what} ({length} bytes) lies outside the file of {self.file.getlength()} bytes",
                               node=self._where(), offset=offset)
        buf = bytearray(length)
        await self.file.preadv(offset, memoryview(buf))
        return bytes(buf)

    async def _open_dynamic(self, file_len: int) -> None:
        raw = await self._read_meta(self.footer.data_offset, fmt.DYN_HEADER_SIZE, "dynamic disk header")
        if raw[:8] != fmt.DYN_COOKIE:
            raise OpenError("Invalid header magic")
        dyn = fmt.DynHeader.parse(raw)
        if not dyn.stored_checksum_ok(raw):
            # QEMU does not check this one (its own check would refuse images QEMU reads); only log it.
            self.node.log.debug("vpc_dyn_header_checksum_wrong", offset=self.footer.data_offset)
        bs = dyn.block_size
        if bs < SECTOR or bs & (bs - 1):
            raise OpenError(f"Invalid block size {bs}")
        self.dyn, self.block_size, self.bitmap_size = dyn, bs, fmt.bitmap_size(bs)
        entries = dyn.max_table_entries
        if self.size // bs > 0xFFFFFFFF:
            raise OpenError("Too many blocks")
        if entries * bs < self.size:
            raise OpenError("Page table too small")
        if entries > 0x7FFFFFFF // 4:
            raise OpenError(f"Max Table Entries too large ({entries})")
        self.bat_offset = dyn.table_offset
        if self.bat_offset + entries * 4 > file_len:
            raise OpenError(TRUNCATED)
        bat = array("I", await self._read_meta(self.bat_offset, entries * 4, "BAT"))
        if array("I", [1]).tobytes()[0] == 1:
            bat.byteswap()
        self.bat = bat
        meta_end = (self.bat_offset + entries * 4 + SECTOR - 1) & ~(SECTOR - 1)
        free = max(meta_end, self.footer.data_offset + fmt.DYN_HEADER_SIZE)
        for loc in dyn.locators:
            if loc.platform != b"\0\0\0\0" and loc.data_offset < file_len:
                # Locator data may follow the BAT: never allocate over it (capped at the trailing footer, since
                # writers disagree on whether data_space counts sectors or bytes).
                free = max(free, min(file_len - fmt.FOOTER_SIZE, loc.data_offset + self._locator_space(loc)))
        metadata = ((0, fmt.FOOTER_SIZE), (self.footer.data_offset, self.footer.data_offset + fmt.DYN_HEADER_SIZE),
                    (self.bat_offset, self.bat_offset + entries * 4))
        span = self.bitmap_size + bs
        for i, entry in enumerate(bat):
            if entry == UNALLOCATED:
                continue
            start = entry * SECTOR
            if any(start < hi and start + span > lo for lo, hi in metadata):
                raise ImageCorrupt(f"BAT entry {i} (block at {start}) overlaps the footer, header or BAT",
                                   node=self._where(), offset=self.bat_offset + 4 * i)
            free = max(free, start + span)
        if free > file_len:
            raise OpenError(TRUNCATED)
        # Never allocate over data we do not know about: the trailing footer marks the end.
        self.free_offset = max(free, (file_len - fmt.FOOTER_SIZE) & ~(SECTOR - 1))

    @staticmethod
    def _locator_space(loc: fmt.Locator) -> int:
        # The specification counts data_space in sectors; Windows writes bytes. Take the larger reading
        # that still makes sense.
        space = loc.data_space * SECTOR if loc.data_space < 0x10000 else loc.data_space
        return max(space, loc.data_length)

    async def _parent_references(self) -> list[tuple[str, str]]:
        """Every name the image gives its parent: (platform, path) of each locator, then the header's name."""
        refs: list[tuple[str, str]] = []
        order = {fmt.PLAT_W2RU: 0, fmt.PLAT_W2KU: 1, fmt.PLAT_MACX: 2}
        for loc in sorted(self.dyn.locators, key=lambda c: order.get(c.platform, 9)):
            if loc.platform not in order or not 0 < loc.data_length <= 0x10000:
                continue
            try:
                data = await self._read_meta(loc.data_offset, loc.data_length, "parent locator")
            except ImageCorrupt:
                continue
            name = fmt.decode_locator(loc.platform, data)
            if name:
                refs.append((loc.platform.decode(), name))
        header_name = fmt.decode_parent_name(self.dyn.parent_name)
        if header_name:
            refs.append(("name", header_name))
        return refs

    async def _open_parent(self) -> None:
        """Differencing disk: the parent named by the locators (relative first), else the header's name."""
        self.references = await self._parent_references()
        if self.node.backing_disabled():
            await self.node.open_backing(None)  # consumes backing=null
            return
        names: list[str] = []
        for _platform, name in self.references:
            if name not in names:
                names.append(name)
        for base in [n.rsplit("/", 1)[-1] for n in names]:
            if base not in names:
                names.append(base)
        # Only plain paths: a Windows drive path is useless here (its base name is tried instead), and an
        # untrusted image must not make us open json: trees or network URLs.
        names = [n for n in names if ":" not in n.split("/", 1)[0]]
        if not names and not self.node.has_child_spec("backing"):
            raise OpenError("differencing VHD names no parent (no parent locator and no parent name)")
        self.backing_name = names[0] if names else None
        if self.node.has_child_spec("backing"):
            await self.node.open_backing(None)
            return
        errors: list[str] = []
        for name in names:
            try:
                await self.node.open_backing(name, None)
                self.backing_name = name
                return
            except BlockGraphError as e:
                errors.append(f"{name}: {e}")
        raise OpenError("Could not open the parent of differencing VHD: " + "; ".join(errors))

    async def close(self) -> None:
        self.bitmaps = OrderedDict()

    async def getlength(self) -> int:
        return self.size

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if not self.fixed:
            out["cluster-size"] = self.block_size
        if self.backing_name:
            out["backing-filename"] = self.backing_name
            backing = self.node.backing
            if backing is not None:
                out["full-backing-filename"] = backing.node.filename
                out["backing-filename-format"] = backing.node.driver_name
        if self.references:
            # Only differencing disks (which QEMU cannot follow) have these: every external name the image holds.
            out["format-specific"] = {"type": "vpc", "data": {
                "parent-uuid": str(uuid.UUID(bytes=self.dyn.parent_uuid)),
                "parent-locators": [{"platform": p, "path": n} for p, n in self.references]}}
        return out

    # ------------------------------------------------------------ mapping

    def _entry(self, block: int) -> int:
        return self.bat[block] if block < len(self.bat) else UNALLOCATED

    async def _bitmap(self, block: int) -> bytearray:
        bm = self.bitmaps.get(block)
        if bm is not None:
            self.bitmaps.move_to_end(block)
            return bm
        bm = bytearray(await self._read_meta(self._entry(block) * SECTOR, self.bitmap_size, "block bitmap"))
        self.bitmaps[block] = bm
        if len(self.bitmaps) > BITMAP_CACHE:
            self.bitmaps.popitem(last=False)
        return bm

    def _data_at(self, block: int, sector_in_block: int) -> int:
        return self._entry(block) * SECTOR + self.bitmap_size + sector_in_block * SECTOR

    async def _read_absent(self, offset: int, buf: memoryview) -> None:
        """Sectors this image does not hold: the parent's data, or zeros."""
        backing = self.node.backing
        n = 0
        if backing is not None:
            n = max(0, min(len(buf), backing.getlength() - offset))
            if n:
                await backing.preadv(offset, buf[:n])
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    # ------------------------------------------------------------ data path

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        if self.fixed:
            await self.file.preadv(offset, buf, flags)
            return
        for pos, off, block, in_block, n in block_chunks(offset, len(buf), self.block_size):
            if self._entry(block) == UNALLOCATED:
                await self._read_absent(off, buf[pos:pos + n])
            else:
                bm = await self._bitmap(block)
                first, count = in_block // SECTOR, n // SECTOR
                done = 0
                while done < count:
                    present, run = _bits(bm, first + done, count - done)
                    piece = buf[pos + done * SECTOR:pos + (done + run) * SECTOR]
                    if present:
                        await self.file.preadv(self._data_at(block, first + done), piece)
                    else:
                        await self._read_absent(off + done * SECTOR, piece)
                    done += run

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        if self.fixed:
            await self.file.pwritev(offset, buf, flags)
            return
        for pos, _off, block, in_block, n in block_chunks(offset, len(buf), self.block_size):
            piece = buf[pos:pos + n]
            if self._entry(block) == UNALLOCATED:
                await self._allocate(block, in_block, piece)
            else:
                await self.file.pwritev(self._data_at(block, in_block // SECTOR), piece)
                bm = await self._bitmap(block)
                if _set_bits(bm, in_block // SECTOR, n // SECTOR):
                    # After the data: a crash in between leaves the old (unmarked) state, never garbage.
                    await self.file.pwritev(self._entry(block) * SECTOR, memoryview(bm))

    async def _allocate(self, block: int, in_block: int, data: memoryview) -> None:
        """A new block at the end of the file, where the trailing footer is now.

        QEMU writes the bitmap, then the footer at the new end, then the BAT entry, then the data.
        We keep that order but write the data together with the bitmap, before the footer and the
        BAT entry, and flush before the BAT entry (the commit point): a crash before it leaves only
        unreferenced space, never a BAT entry pointing at unwritten data, and the copy of the footer
        at offset 0 keeps the image readable while the trailing one moves. The BAT entry itself is
        durable with the next flush, like the data of any write.
        """
        if block >= len(self.bat) or block * self.block_size >= self.size:
            raise BlockIOError(errno.EIO, node=self.node.node_name, op="write", offset=block * self.block_size,
                               detail=f"block {block} is outside the BAT")
        start = self.free_offset
        bm = bytearray(self.bitmap_size)
        _set_bits(bm, in_block // SECTOR, len(data) // SECTOR)
        data_at = start + self.bitmap_size
        await self.file.pwritev(start, memoryview(bm))
        if self.file.getlength() > data_at + fmt.FOOTER_SIZE:
            # Unknown bytes lie where the block goes; zero it so readers that ignore the bitmap see zeros.
            await self.file.pwrite_zeroes(data_at, self.block_size)
        await self.file.pwritev(data_at + in_block, data)
        new_end = data_at + self.block_size
        await self.file.pwritev(new_end, memoryview(self.footer_raw))
        await self.file.flush()
        self.bat[block] = start // SECTOR
        # Durable with the next flush, like any write.
        await self.file.pwritev(self.bat_offset + 4 * block, memoryview((start // SECTOR).to_bytes(4, "big")))
        self.free_offset = new_end
        self.bitmaps[block] = bm
        if len(self.bitmaps) > BITMAP_CACHE:
            self.bitmaps.popitem(last=False)

    async def pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        """Nothing to do where the range already reads as zeros without a parent; else write zeros."""
        if self.fixed or self.node.backing is not None:
            raise NotSupported("vpc writes zeros as data")
        first, last = offset // self.block_size, (offset + length - 1) // self.block_size
        for block in range(first, last + 1):
            if self._entry(block) != UNALLOCATED:
                raise NotSupported("vpc cannot deallocate a block")

    async def flush(self) -> None:
        """Metadata is written through; core flushes the file next."""

    async def block_status(self, offset: int, length: int, want_zero: bool) -> BlockStatus:
        if self.fixed:
            # Data at the same offset; the file says where it reads as zeros (QEMU: DATA | RECURSE).
            return BlockStatus(Status.DATA | Status.OFFSET_VALID | Status.RECURSE, length, offset, self.file.node)
        absent = Status.NONE if self.node.backing is not None else Status.ZERO
        block, in_block = divmod(offset, self.block_size)
        if self._entry(block) == UNALLOCATED:
            n = self.block_size - in_block
            block += 1
            while n < length and self._entry(block) == UNALLOCATED:
                n += self.block_size
                block += 1
            return BlockStatus(absent, min(n, length))
        n = min(length, self.block_size - in_block)
        present, run = _bits(await self._bitmap(block), in_block // SECTOR, n // SECTOR)
        if present:
            return BlockStatus(Status.DATA | Status.OFFSET_VALID, run * SECTOR,
                               self._data_at(block, in_block // SECTOR), self.file.node)
        return BlockStatus(absent, run * SECTOR)

    # ------------------------------------------------------------ create

    @classmethod
    async def create(cls, session: Any, filename: str, options: VpcCreateOptions) -> None:
        from .create import create

        await create(session, filename, options)
