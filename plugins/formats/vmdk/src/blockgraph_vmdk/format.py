"""VMDK on-disk structures: sparse extent headers, markers, and probing.

All integers are little-endian; offsets in headers, grain directories and
grain tables count 512-byte sectors. Two sparse headers exist: ``KDMV``
(hosted sparse extents, version 1-3) and ``COWD`` (ESX vmfsSparse).
"""

from __future__ import annotations

import struct

import attrs

SECTOR = 512
MAGIC_KDMV = b"KDMV"
MAGIC_COWD = b"COWD"

FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESS = 1 << 16
FLAG_MARKER = 1 << 17
COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFFFFFFFFFFFFFF
GTE_ZEROED = 1

MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3

MAX_GRAIN_SECTORS = 0x200000  # 1 GiB grains are not realistic: a corrupt header (QEMU's limit)
MAX_GD_ENTRIES = 32 * 1024 * 1024  # QEMU's bound on the grain directory
MAX_EXTENT_SECTORS = 1 << 32  # grain table entries are 32-bit sector numbers
DESC_MAX = (1 << 20) - 1  # the most of a descriptor file that is read

# After the 4-byte magic: version, flags, capacity, granularity, desc_offset, desc_size, num_gtes_per_gt,
# rgd_offset, gd_offset, grain_offset, filler, check bytes, compressAlgorithm (79 bytes).
_KDMV = struct.Struct("<IIQQQQIQQQc4sH")
_COWD = struct.Struct("<IIIIIIIIII")
CHECK_BYTES = b"\n \r\n"


@attrs.define
class SparseHeader:
    """A KDMV header (or a COWD one mapped onto the same fields)."""

    version: int
    flags: int
    capacity: int  # sectors
    granularity: int  # sectors per grain
    desc_offset: int
    desc_size: int
    num_gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    grain_offset: int
    compress_algorithm: int = 0
    cowd: bool = False
    cowd_gd_entries: int = 0

    @classmethod
    def parse(cls, sector: bytes) -> SparseHeader:
        """Parse the first sector of a sparse extent; the caller checked the magic."""
        if sector[:4] == MAGIC_COWD:
            (version, flags, disk_sectors, granularity, l1dir_offset, l1dir_size,
             _file_sectors, _c, _h, _s) = _COWD.unpack_from(sector, 4)
            # COWD has fixed 4096-entry grain tables and no redundant directory.
            return cls(version, flags, disk_sectors, granularity, 0, 0, 4096, 0, l1dir_offset, 0, cowd=True,
                       cowd_gd_entries=l1dir_size)
        (version, flags, capacity, granularity, desc_offset, desc_size, num_gtes, rgd_offset, gd_offset,
         grain_offset, _filler, _check, compress) = _KDMV.unpack_from(sector, 4)
        return cls(version, flags, capacity, granularity, desc_offset, desc_size, num_gtes, rgd_offset,
                   gd_offset, grain_offset, compress)

    def pack(self) -> bytes:
        """The 512-byte header sector (KDMV only)."""
        body = _KDMV.pack(self.version, self.flags, self.capacity, self.granularity, self.desc_offset,
                          self.desc_size, self.num_gtes_per_gt, self.rgd_offset, self.gd_offset,
                          self.grain_offset, b"\0", CHECK_BYTES, self.compress_algorithm)
        return (MAGIC_KDMV + body).ljust(SECTOR, b"\0")

    @property
    def compressed(self) -> bool:
        return not self.cowd and self.compress_algorithm == COMPRESSION_DEFLATE

    @property
    def gd_entries(self) -> int:
        if self.cowd:
            return self.cowd_gd_entries
        per_gt = self.num_gtes_per_gt * self.granularity
        return (self.capacity + per_gt - 1) // per_gt if per_gt else 0


def marker(value: int, size: int, kind: int = 0) -> bytes:
    """A stream marker: u64 value, u32 size; metadata markers (size 0) carry a type and fill a sector."""
    if size:
        return struct.pack("<QI", value, size)
    return struct.pack("<QII", value, 0, kind).ljust(SECTOR, b"\0")


def parse_marker(buf: bytes) -> tuple[int, int, int]:
    """(value, size, type) of the marker at the start of ``buf``; type is -1 for a grain marker."""
    value, size = struct.unpack_from("<QI", buf, 0)
    if size:
        return value, size, -1
    return value, 0, struct.unpack_from("<I", buf, 12)[0]


def probe(buf: bytes) -> int:
    """QEMU's vmdk_probe: a sparse magic, or a text descriptor whose first real line is ``version=1|2|3``."""
    if len(buf) < 4:
        return 0
    if buf[:4] in (MAGIC_KDMV, MAGIC_COWD):
        return 100
    p, end = 0, len(buf)
    while p < end:
        c = buf[p:p + 1]
        if c == b"#":
            nl = buf.find(b"\n", p)
            p = end if nl < 0 else nl + 1
            continue
        if c == b" ":
            while p < end and buf[p:p + 1] == b" ":
                p += 1
            if p < end and buf[p:p + 1] == b"\r":
                p += 1
            if p == end or buf[p:p + 1] != b"\n":
                return 0  # only blank lines may come before version=
            p += 1
            continue
        for v in (b"1", b"2", b"3"):
            if buf.startswith(b"version=" + v + b"\n", p) or buf.startswith(b"version=" + v + b"\r\n", p):
                return 100
        return 0
    return 0
