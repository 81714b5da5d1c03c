"""The vdi format (VirtualBox): static and dynamic images of 1 MiB blocks mapped by a block map.

Block map entries are block numbers in the data area, or UNALLOCATED (reads as zeros,
nothing stored) or DISCARDED (a zero block: reads as zeros, nothing stored). A dynamic
image allocates blocks at the end of the data area in the order they are first written.
"""

from __future__ import annotations

import errno
import sys
from array import array
from typing import Any, ClassVar

import attrs
from blockgraph.driver import BlockStatus, CheckFix, CheckResult, DriverKind, ReqFlags, Status
from blockgraph.errors import BlockIOError, ImageCorrupt, NotSupported, OpenError
from blockgraph.io import block_chunks
from blockgraph.options import opt, parse_bool, parse_size
from blockgraph.perms import ChildRole

from . import header as hdr
from .header import BLOCK_SIZE, HEADER_SIZE, SECTOR, TYPE_STATIC, UNALLOCATED, is_allocated

_LITTLE = sys.byteorder == "little"


@attrs.frozen(kw_only=True)
class VdiOptions:
    """vdi has no runtime options."""


@attrs.frozen(kw_only=True)
class VdiCreateOptions:
    size: int = opt(converter=parse_size, help="Virtual disk size")
    static: bool = opt(False, converter=parse_bool, help="VDI static (pre-allocated) image")


def _le32(data: bytes) -> array:
    a = array("I", data)
    if not _LITTLE:
        a.byteswap()
    return a


def _to_le(a: array) -> bytes:
    if _LITTLE:
        return a.tobytes()
    b = array("I", a)
    b.byteswap()
    return b.tobytes()


class VdiDriver:
    name: ClassVar[str] = "vdi"
    kind: ClassVar[DriverKind] = DriverKind.FORMAT
    api_version: ClassVar[int] = 1
    child_options: ClassVar[tuple[str, ...]] = ("file",)
    Options: ClassVar[type] = VdiOptions
    CreateOptions: ClassVar[type] = VdiCreateOptions
    create_shown_defaults: ClassVar[dict[str, str]] = {"static": "off"}  # on qemu-img's Formatting line

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        from .probe import probe

        return probe(header, filename)

    async def open(self, node: Any, options: VdiOptions) -> None:
        self.node = node
        self.file = await node.open_child("file", ChildRole.IMAGE)
        if self.file.getlength() < HEADER_SIZE:
            raise OpenError(f"Could not read the VDI header: the file has only {self.file.getlength()} bytes")
        raw = bytearray(HEADER_SIZE)
        await self.file.preadv(0, memoryview(raw))
        h = hdr.Header.parse(bytes(raw))
        h.check()
        self.header = h
        self.size = h.disk_size
        bmap_at, bmap_len = h.offset_bmap, h.bmap_bytes
        if bmap_at + bmap_len > self.file.getlength():
            raise ImageCorrupt(f"the block map ({bmap_len} bytes for {h.blocks_in_image} blocks) runs past the end "
                               f"of the file ({self.file.getlength()} bytes)", node=node.node_name, offset=bmap_at)
        raw = bytearray(bmap_len)
        await self.file.preadv(bmap_at, memoryview(raw))
        self.bmap = _le32(bytes(raw))
        node.set_limits(request_alignment=SECTOR)

    async def close(self) -> None:
        """Metadata is written through; nothing to release."""

    async def getlength(self) -> int:
        return self.size

    def info(self) -> dict[str, Any]:
        return {"cluster-size": self.header.block_size}

    # ------------------------------------------------------------ data path

    def _data_offset(self, block: int, op: str) -> int | None:
        """Where block ``block`` lives in the file; None when it reads as zeros."""
        entry = self.bmap[block]
        if not is_allocated(entry):
            return None
        if entry >= self.header.blocks_in_image:
            raise BlockIOError(errno.EIO, node=self.node.node_name, op=op, offset=block * BLOCK_SIZE,
                               detail=f"corrupt image: block map entry {block} points to block {entry}, beyond the "
                                      f"{self.header.blocks_in_image} blocks of the image")
        return self.header.offset_data + entry * BLOCK_SIZE

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        file_len = self.file.getlength()
        for pos, _, block, in_block, n in block_chunks(offset, len(buf), BLOCK_SIZE):
            piece = buf[pos:pos + n]
            at = self._data_offset(block, "read")
            # Past the end of the file reads as zeros, as QEMU's file driver pads short reads.
            have = 0 if at is None else max(0, min(n, file_len - at - in_block))
            if have:
                await self.file.preadv(at + in_block, piece[:have], flags)
            if have < n:
                piece[have:] = bytes(n - have)

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        first_new = last_new = -1
        for pos, _, block, in_block, n in block_chunks(offset, len(buf), BLOCK_SIZE):
            at = self._data_offset(block, "write")
            if at is not None:
                await self.file.pwritev(at + in_block, buf[pos:pos + n])
            else:
                await self._allocate(block, in_block, buf[pos:pos + n])
                first_new = block if first_new < 0 else first_new
                last_new = block
        if first_new >= 0:
            await self._write_metadata(first_new, last_new)

    async def _allocate(self, block: int, in_block: int, data: memoryview) -> None:
        """The next block of the data area, written whole (zeros around the data) before any metadata."""
        h = self.header
        if h.blocks_allocated >= h.blocks_in_image:
            raise BlockIOError(errno.EIO, node=self.node.node_name, op="write", offset=block * BLOCK_SIZE,
                               detail=f"corrupt image: {h.blocks_allocated} blocks already allocated of "
                                      f"{h.blocks_in_image}")
        entry = h.blocks_allocated
        at = h.offset_data + entry * BLOCK_SIZE
        if len(data) == BLOCK_SIZE:
            await self.file.pwritev(at, data)
        else:
            whole = bytearray(BLOCK_SIZE)
            whole[in_block:in_block + len(data)] = data
            await self.file.pwritev(at, memoryview(whole))
        self.bmap[block] = entry
        h.blocks_allocated += 1

    async def _write_metadata(self, first: int, last: int) -> None:
        """QEMU's order: the header (blocks_allocated) first, then the block map sectors that changed.

        A crash between the two leaves a counted but unused block (a leak that check reports), never
        two map entries sharing one block.
        """
        await self.file.pwritev(0, memoryview(self.header.pack()))
        per = SECTOR // 4
        lo, hi = first // per * per, (last // per + 1) * per
        await self.file.pwritev(self.header.offset_bmap + lo * 4, memoryview(_to_le(self.bmap[lo:hi])))

    async def pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        """Blocks that store nothing already read as zeros; anything else is written as zeros."""
        for block in range(offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE + 1):
            if is_allocated(self.bmap[block]):
                raise NotSupported("vdi writes zeros as data in allocated blocks")

    async def flush(self) -> None:
        """Metadata is written through; core flushes the file next."""

    async def block_status(self, offset: int, length: int, want_zero: bool) -> BlockStatus:
        block, in_block = divmod(offset, BLOCK_SIZE)
        at = self._data_offset(block, "block status")
        if at is None:
            n = BLOCK_SIZE - in_block
            block += 1
            while n < length and block < len(self.bmap) and not is_allocated(self.bmap[block]):
                n += BLOCK_SIZE
                block += 1
            return BlockStatus(Status.ZERO, min(n, length))
        # QEMU asks the file of a static image where it reads as zeros (BDRV_BLOCK_RECURSE), not a dynamic one's.
        rec = Status.RECURSE if self.header.image_type == TYPE_STATIC else Status.NONE
        return BlockStatus(Status.DATA | Status.OFFSET_VALID | rec, min(length, BLOCK_SIZE - in_block),
                           at + in_block, self.file.node)

    # ------------------------------------------------------------ check

    def check(self, fix: CheckFix) -> CheckResult:
        """QEMU's vdi_co_check: every allocated entry in range and used once, and the allocated count."""
        if fix:
            raise NotSupported("vdi cannot repair images")
        h = self.header
        res = CheckResult()
        owner: dict[int, int] = {}
        counted = 0
        for block in range(h.blocks_in_image):
            entry = self.bmap[block]
            if not is_allocated(entry):
                continue
            if entry < h.blocks_in_image:
                counted += 1
                if entry in owner:
                    # QEMU's text names the data block twice.
                    res.messages.append(f"ERROR: block index {entry} also used by {entry}")
                    res.corruptions += 1
                else:
                    owner[entry] = block
            else:
                res.messages.append(f"ERROR: block index {block} too large, is {entry}")
                res.corruptions += 1
        if counted != h.blocks_allocated:
            res.messages.append(f"ERROR: allocated blocks mismatch, is {counted}, should be {h.blocks_allocated}")
            res.corruptions += 1
        return res

    # ------------------------------------------------------------ create

    @classmethod
    async def create(cls, session: Any, filename: str, options: VdiCreateOptions) -> None:
        size = (options.size + SECTOR - 1) // SECTOR * SECTOR
        if size > hdr.DISK_SIZE_MAX:
            raise OpenError(f"Unsupported VDI image size (size is 0x{size:x}, max supported is "
                            f"0x{hdr.DISK_SIZE_MAX:x})")
        h = hdr.new_header(size, options.static)
        bmap = array("I", [UNALLOCATED] * h.blocks_in_image) if not options.static else \
            array("I", range(h.blocks_in_image))
        raw = _to_le(bmap)
        raw += bytes(h.bmap_bytes - len(raw))
        proto = session.registry.protocol_for(filename) or "file"
        proto_cls = session.registry.driver(proto)
        await proto_cls.create(session, filename, proto_cls.CreateOptions(size=0))
        blk = await session.open_backend(filename, fmt=proto)
        try:
            end = h.offset_data + (h.blocks_in_image * BLOCK_SIZE if options.static else 0)
            await blk.truncate(end)
            await blk.pwritev(0, memoryview(h.pack() + raw))
            await blk.flush()
        finally:
            await blk.close()
