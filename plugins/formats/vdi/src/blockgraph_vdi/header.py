"""The VDI header (little-endian, 512 bytes at offset 0) and QEMU 7.2's checks of it."""

from __future__ import annotations

import struct
import uuid

import attrs
from blockgraph.errors import OpenError

from .probe import HEADER_SIZE, SIGNATURE

SECTOR = 512
VERSION_1_1 = 0x00010001
TYPE_DYNAMIC, TYPE_STATIC = 1, 2
BLOCK_SIZE = 1 << 20  # the only block size QEMU (and VirtualBox) use
UNALLOCATED = 0xFFFFFFFF
DISCARDED = 0xFFFFFFFE  # a zero block: reads as zeros, no data
BLOCKS_IN_IMAGE_MAX = 0x1FFFFF80  # INT_MAX / 4, down to whole block-map sectors (QEMU)
DISK_SIZE_MAX = BLOCKS_IN_IMAGE_MAX * BLOCK_SIZE
TEXT = b"<<< QEMU VM Virtual Disk Image >>>\n"

# text, signature, version, header_size, image_type, image_flags, description, offset_bmap, offset_data,
# cylinders, heads, sectors, sector_size, unused1, disk_size, block_size, block_extra, blocks_in_image,
# blocks_allocated, uuid_image, uuid_last_snap, uuid_link, uuid_parent
_HEADER = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16s")
BLOCKS_ALLOCATED_AT = struct.calcsize("<64sIIIII256sIIIIIIIQIII")


def is_allocated(entry: int) -> bool:
    return entry < DISCARDED


@attrs.define
class Header:
    text: bytes = TEXT
    signature: int = SIGNATURE
    version: int = VERSION_1_1
    header_size: int = 0x180
    image_type: int = TYPE_DYNAMIC
    image_flags: int = 0
    description: bytes = b""
    offset_bmap: int = HEADER_SIZE
    offset_data: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    sector_size: int = SECTOR
    unused1: int = 0
    disk_size: int = 0
    block_size: int = BLOCK_SIZE
    block_extra: int = 0
    blocks_in_image: int = 0
    blocks_allocated: int = 0
    uuid_image: bytes = b"\0" * 16
    uuid_last_snap: bytes = b"\0" * 16
    uuid_link: bytes = b"\0" * 16
    uuid_parent: bytes = b"\0" * 16

    @classmethod
    def parse(cls, raw: bytes) -> Header:
        return cls(*_HEADER.unpack_from(raw))

    def pack(self) -> bytes:
        buf = bytearray(HEADER_SIZE)
        _HEADER.pack_into(buf, 0, *attrs.astuple(self, recurse=False))
        return bytes(buf)

    @property
    def bmap_bytes(self) -> int:
        """The block map's size on disk, whole sectors."""
        return (self.blocks_in_image * 4 + SECTOR - 1) // SECTOR * SECTOR

    def check(self) -> None:
        """QEMU's refusals, with its texts; odd disk sizes are rounded up to sectors first."""
        if self.disk_size > DISK_SIZE_MAX:
            raise OpenError(f"Unsupported VDI image size (size is 0x{self.disk_size:x}, max supported is "
                            f"0x{DISK_SIZE_MAX:x})")
        if self.disk_size % SECTOR:
            # 'VBoxManage convertfromraw' makes such images; QEMU accepts them, rounded up.
            self.disk_size += SECTOR - self.disk_size % SECTOR
        if self.signature != SIGNATURE:
            raise OpenError(f"Image not in VDI format (bad signature {self.signature:08x})")
        if self.version != VERSION_1_1:
            raise OpenError(f"unsupported VDI image (version {self.version >> 16}.{self.version & 0xFFFF})")
        if self.offset_bmap % SECTOR:
            raise OpenError(f"unsupported VDI image (unaligned block map offset 0x{self.offset_bmap:x})")
        if self.offset_data % SECTOR:
            raise OpenError(f"unsupported VDI image (unaligned data offset 0x{self.offset_data:x})")
        if self.sector_size != SECTOR:
            raise OpenError(f"unsupported VDI image (sector size {self.sector_size} is not {SECTOR})")
        if self.block_size != BLOCK_SIZE:
            raise OpenError(f"unsupported VDI image (block size {self.block_size} is not {BLOCK_SIZE})")
        if self.disk_size > self.blocks_in_image * self.block_size:
            raise OpenError(f"unsupported VDI image (disk size {self.disk_size}, image bitmap has room for "
                            f"{self.blocks_in_image * self.block_size})")
        if self.uuid_link != b"\0" * 16:
            raise OpenError("unsupported VDI image (non-NULL link UUID)")
        if self.uuid_parent != b"\0" * 16:
            raise OpenError("unsupported VDI image (non-NULL parent UUID)")
        if self.blocks_in_image > BLOCKS_IN_IMAGE_MAX:
            raise OpenError(f"unsupported VDI image (too many blocks {self.blocks_in_image}, max is "
                            f"{BLOCKS_IN_IMAGE_MAX})")


def new_header(size: int, static: bool) -> Header:
    blocks = -(-size // BLOCK_SIZE)
    h = Header(image_type=TYPE_STATIC if static else TYPE_DYNAMIC, disk_size=size, blocks_in_image=blocks,
               blocks_allocated=blocks if static else 0, uuid_image=uuid.uuid4().bytes,
               uuid_last_snap=uuid.uuid4().bytes)
    h.offset_data = HEADER_SIZE + h.bmap_bytes
    return h
