"""VHD on-disk structures: the footer, the dynamic disk header, parent locators, CHS geometry.

Everything is big-endian. The footer is 512 bytes (a copy also sits at offset 0 of
dynamic and differencing disks); the dynamic header is 1024 bytes. Sizes follow
QEMU 7.2, so virtual sizes agree with ``qemu-img info``.
"""

from __future__ import annotations

import struct
import time
import uuid

import attrs

from .probe import COOKIE

FOOTER_SIZE = 512
DYN_HEADER_SIZE = 1024
SECTOR = 512
DYN_COOKIE = b"cxsparse"
TYPE_FIXED, TYPE_DYNAMIC, TYPE_DIFFERENCING = 2, 3, 4
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
UNALLOCATED = 0xFFFFFFFF
TIMESTAMP_BASE = 946684800  # 2000-01-01 00:00:00 UTC, the VHD epoch
DEFAULT_BLOCK_SIZE = 2 << 20

CHS_MAX_C, CHS_MAX_H, CHS_MAX_S = 65535, 16, 255
MAX_GEOMETRY = CHS_MAX_C * CHS_MAX_H * CHS_MAX_S  # sectors
MAX_SECTORS = 0xFF000000  # 2040 GiB

# creator, features, version, data_offset, timestamp, creator_app, major, minor, creator_os,
# orig_size, current_size, cyls, heads, secs, type, checksum, uuid, saved_state
_FOOTER = struct.Struct(">8sIIQI4sHH4sQQHBBII16sB")
# cookie, data_offset, table_offset, version, max_table_entries, block_size, checksum,
# parent_uuid, parent_timestamp, reserved, parent_name
_DYN = struct.Struct(">8sQQIIII16sII512s")
_LOCATOR = struct.Struct(">4sIIIQ")
LOCATOR_AT = _DYN.size  # 8 locators of 24 bytes follow the parent name

# Creator apps whose images are sized by current_size rather than CHS (QEMU 7.2's table).
CURRENT_SIZE_APPS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")


def checksum(data: bytes | bytearray | memoryview) -> int:
    """One's complement of the byte sum (the checksum field itself must read as zero)."""
    return ~sum(data) & 0xFFFFFFFF


@attrs.define
class Footer:
    features: int = 2
    version: int = 0x00010000
    data_offset: int = NO_OFFSET
    timestamp: int = 0
    creator_app: bytes = b"qemu"
    major: int = 5
    minor: int = 3
    creator_os: bytes = b"Wi2k"
    orig_size: int = 0
    current_size: int = 0
    cyls: int = 0
    heads: int = 0
    secs: int = 0
    disk_type: int = TYPE_DYNAMIC
    checksum: int = 0
    uuid: bytes = b"\0" * 16
    saved_state: int = 0

    @classmethod
    def parse(cls, raw: bytes) -> Footer:
        f = _FOOTER.unpack_from(raw)
        return cls(*f[1:])

    def stored_checksum_ok(self, raw: bytes) -> bool:
        buf = bytearray(raw[:FOOTER_SIZE])
        buf[64:68] = b"\0\0\0\0"
        return checksum(buf) == self.checksum

    def pack(self) -> bytes:
        fields = attrs.astuple(self, recurse=False)
        buf = bytearray(FOOTER_SIZE)
        _FOOTER.pack_into(buf, 0, COOKIE, *fields[:14], 0, *fields[15:])
        struct.pack_into(">I", buf, 64, checksum(buf))
        return bytes(buf)

    @property
    def chs_sectors(self) -> int:
        return self.cyls * self.heads * self.secs


@attrs.define
class Locator:
    platform: bytes
    data_space: int
    data_length: int
    data_offset: int


@attrs.define
class DynHeader:
    data_offset: int = NO_OFFSET
    table_offset: int = 0
    version: int = 0x00010000
    max_table_entries: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    checksum: int = 0
    parent_uuid: bytes = b"\0" * 16
    parent_timestamp: int = 0
    parent_name: bytes = b"\0" * 512
    locators: list[Locator] = attrs.Factory(list)

    @classmethod
    def parse(cls, raw: bytes) -> DynHeader:
        d = _DYN.unpack_from(raw)
        locs = []
        for i in range(8):
            platform, space, length, _reserved, offset = _LOCATOR.unpack_from(raw, LOCATOR_AT + 24 * i)
            locs.append(Locator(platform, space, length, offset))
        return cls(d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[10], locs)

    def stored_checksum_ok(self, raw: bytes) -> bool:
        buf = bytearray(raw[:DYN_HEADER_SIZE])
        buf[36:40] = b"\0\0\0\0"
        return checksum(buf) == self.checksum

    def pack(self) -> bytes:
        buf = bytearray(DYN_HEADER_SIZE)
        _DYN.pack_into(buf, 0, DYN_COOKIE, self.data_offset, self.table_offset, self.version,
                       self.max_table_entries, self.block_size, 0, self.parent_uuid, self.parent_timestamp, 0,
                       self.parent_name)
        for i, loc in enumerate(self.locators[:8]):
            _LOCATOR.pack_into(buf, LOCATOR_AT + 24 * i, loc.platform, loc.data_space, loc.data_length, 0,
                               loc.data_offset)
        struct.pack_into(">I", buf, 36, checksum(buf))
        return bytes(buf)


def bitmap_size(block_size: int) -> int:
    """Bytes of the sector bitmap in front of each data block, padded to whole sectors."""
    return (block_size // (8 * SECTOR) + SECTOR - 1) & ~(SECTOR - 1)


def geometry(total_sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a sector count, the VHD specification's algorithm."""
    total_sectors = min(total_sectors, MAX_GEOMETRY)
    if total_sectors >= 65535 * 16 * 63:
        secs, heads = 255, 16
        cth = total_sectors // secs
    else:
        secs = 17
        cth = total_sectors // secs
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            secs, heads = 31, 16
            cth = total_sectors // secs
        if cth >= heads * 1024:
            secs, heads = 63, 16
            cth = total_sectors // secs
    return cth // heads, heads, secs


def rounded_geometry(size: int, force_size: bool) -> tuple[tuple[int, int, int], int]:
    """The geometry and sector count ``img create`` gives an image of ``size`` bytes (QEMU 7.2).

    Without force_size the size is rounded up until a CHS geometry covers it, so that Virtual PC
    sees the whole disk; with it, the geometry is the maximum and the footer's size is exact.
    """
    if force_size:
        chs = (CHS_MAX_C, CHS_MAX_H, CHS_MAX_S)
    else:
        want = min(MAX_GEOMETRY, size // SECTOR)
        chs, i = (0, 0, 0), 0
        while want > chs[0] * chs[1] * chs[2]:
            chs = geometry(want + i)
            i += 1
    if chs[0] * chs[1] * chs[2] == MAX_GEOMETRY:
        return chs, size // SECTOR
    return chs, chs[0] * chs[1] * chs[2]


def uses_current_size(footer: Footer) -> bool:
    """Whether the creator app sizes the disk by the footer's current_size instead of CHS."""
    return footer.creator_app in CURRENT_SIZE_APPS


def virtual_sectors(footer: Footer, force_size_calc: str | None) -> int:
    """The disk size in sectors as QEMU 7.2 computes it from the footer."""
    sectors = footer.chs_sectors
    use_chs = not uses_current_size(footer) or force_size_calc == "chs"
    if not use_chs or sectors == MAX_GEOMETRY or force_size_calc == "current_size":
        sectors = footer.current_size // SECTOR
    return sectors


def new_footer(disk_type: int, size: int, chs: tuple[int, int, int], force_size: bool, data_offset: int) -> Footer:
    return Footer(data_offset=data_offset, timestamp=max(0, int(time.time()) - TIMESTAMP_BASE) & 0xFFFFFFFF,
                  creator_app=b"qem2" if force_size else b"qemu", orig_size=size, current_size=size,
                  cyls=chs[0], heads=chs[1], secs=chs[2], disk_type=disk_type, uuid=uuid.uuid4().bytes)


# ---------------------------------------------------------------- parent locators

PLAT_W2RU, PLAT_W2KU, PLAT_MACX = b"W2ru", b"W2ku", b"MacX"


def decode_locator(platform: bytes, data: bytes) -> str | None:
    """The parent's path from one locator's data, in POSIX form; None for unknown platforms."""
    if platform in (PLAT_W2RU, PLAT_W2KU):
        text = data.decode("utf-16-le", errors="replace")
    elif platform == PLAT_MACX:
        text = data.decode("utf-8", errors="replace")
        if text.startswith("file://"):
            text = text[7:]
            if not text.startswith("/"):  # file://host/path
                text = "/" + text.split("/", 1)[1] if "/" in text else text
    else:
        return None
    text = text.split("\0", 1)[0].strip()
    if platform != PLAT_MACX:
        text = text.replace("\\", "/")
        while text.startswith("./"):
            text = text[2:]
    return text or None


def decode_parent_name(raw: bytes) -> str | None:
    """The parent's file name from the header's UTF-16 (big-endian) field."""
    text = raw.decode("utf-16-be", errors="replace").split("\0", 1)[0].strip()
    return text.replace("\\", "/") or None
