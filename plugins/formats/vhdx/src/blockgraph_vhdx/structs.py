"""VHDX on-disk structures (Microsoft's VHDX Format Specification v1.00): layout constants, GUIDs, pack/unpack.

Everything is little-endian. GUIDs are stored in Microsoft's mixed-endian form (``uuid.UUID.bytes_le``).
"""

from __future__ import annotations

import struct
import uuid

import attrs

from .probe import FILE_SIGNATURE  # noqa: F401  (re-exported: part of the layout)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
HEADER_SECTION_END = 1 * MiB
HEADER_SIZE = 4 * KiB          # the header's checksum covers this much
REGION_TABLE_SIZE = 64 * KiB   # and the region table's this much
METADATA_TABLE_SIZE = 64 * KiB
LOG_SECTOR = 4 * KiB
BLOCK_SIZE_MIN, BLOCK_SIZE_MAX = 1 * MiB, 256 * MiB
MAX_SECTORS_PER_BLOCK = 1 << 23
MAX_IMAGE_SIZE = 64 * TiB

BAT_GUID = uuid.UUID("2dc27766-f623-4200-9d64-115e9bfd4a08")
METADATA_GUID = uuid.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e")
FILE_PARAMETERS_GUID = uuid.UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
VIRTUAL_DISK_SIZE_GUID = uuid.UUID("2fa54224-cd1b-4876-b211-5dbed83bf4b8")
PAGE83_GUID = uuid.UUID("beca12ab-b2e6-4523-93ef-c309e000c746")
LOGICAL_SECTOR_GUID = uuid.UUID("8141bf1d-a96f-4709-ba47-f233a8faab5f")
PHYSICAL_SECTOR_GUID = uuid.UUID("cda348c7-445d-4471-9cc9-e9885251c556")
PARENT_LOCATOR_GUID = uuid.UUID("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
PARENT_TYPE_VHDX_GUID = uuid.UUID("b04aefb7-d19e-4a81-b789-25b8e9445913")
ZERO_GUID = uuid.UUID(int=0)

META_IS_USER, META_IS_VIRTUAL_DISK, META_IS_REQUIRED = 1, 2, 4
REGION_REQUIRED = 1
PARAM_LEAVE_BLOCKS_ALLOCATED, PARAM_HAS_PARENT = 1, 2

# BAT entry: state in bits 0-2, file offset in MiB in bits 20-63.
BAT_STATE_MASK = 0x7
BAT_OFFSET_MASK = ~((1 << 20) - 1) & ((1 << 64) - 1)
PAYLOAD_NOT_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_ZERO, PAYLOAD_UNMAPPED = 0, 1, 2, 3
PAYLOAD_UNMAPPED_V095, PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT = 5, 6, 7
SB_NOT_PRESENT, SB_PRESENT = 0, 6


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    # google-crc32c (C, 5 ms to import) rather than crc32c, whose package imports importlib.metadata (~18 ms);
    # imported on first use, since probing imports this module.
    import google_crc32c

    return google_crc32c.extend(value, data if isinstance(data, bytes) else bytes(data))  # it wants read-only bytes


def checksum_with_hole(buf: bytes | bytearray | memoryview, at: int = 4) -> int:
    """CRC-32C of ``buf`` with its 4-byte checksum field at ``at`` taken as zero."""
    mv = memoryview(buf)
    crc = crc32c(mv[:at])
    crc = crc32c(b"\0\0\0\0", crc)
    return crc32c(mv[at + 4:], crc)


def seal(buf: bytearray, at: int = 4) -> None:
    """Store the checksum of ``buf`` in its checksum field."""
    struct.pack_into("<I", buf, at, checksum_with_hole(buf, at))


def checksum_ok(buf: bytes | bytearray | memoryview, at: int = 4) -> bool:
    return struct.unpack_from("<I", buf, at)[0] == checksum_with_hole(buf, at)


def guid(raw: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=bytes(raw))


_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")


@attrs.define
class Header:
    sequence_number: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_version: int
    version: int
    log_length: int
    log_offset: int

    @classmethod
    def parse(cls, buf: bytes | memoryview) -> Header | None:
        """The header in a 4 KiB sector, or None when its signature, checksum or version is wrong."""
        if len(buf) < HEADER_SIZE or not checksum_ok(buf[:HEADER_SIZE]):
            return None
        sig, _crc, seq, fwg, dwg, lg, log_version, version, log_len, log_off = _HEADER.unpack_from(buf)
        if sig != b"head" or version != 1:
            return None
        return cls(seq, guid(fwg), guid(dwg), guid(lg), log_version, version, log_len, log_off)

    def pack(self, rest: bytes | memoryview = b"") -> bytearray:
        """The 4 KiB sector, keeping the reserved bytes of ``rest`` (an existing sector) as they were."""
        buf = bytearray(rest[:HEADER_SIZE]) if rest else bytearray(HEADER_SIZE)
        _HEADER.pack_into(buf, 0, b"head", 0, self.sequence_number, self.file_write_guid.bytes_le,
                          self.data_write_guid.bytes_le, self.log_guid.bytes_le, self.log_version, self.version,
                          self.log_length, self.log_offset)
        seal(buf)
        return buf


_RT_HEADER = struct.Struct("<4sIII")
_RT_ENTRY = struct.Struct("<16sQII")


@attrs.frozen
class Region:
    guid: uuid.UUID
    offset: int
    length: int
    required: bool


def parse_region_table(buf: bytes | memoryview) -> list[Region] | None:
    """The region table entries, or None when the table's signature or checksum is wrong."""
    if len(buf) < REGION_TABLE_SIZE or not checksum_ok(buf[:REGION_TABLE_SIZE]):
        return None
    sig, _crc, count, _ = _RT_HEADER.unpack_from(buf)
    if sig != b"regi" or count > 2047:
        return None
    out = []
    for i in range(count):
        g, off, length, bits = _RT_ENTRY.unpack_from(buf, _RT_HEADER.size + i * _RT_ENTRY.size)
        out.append(Region(guid(g), off, length, bool(bits & REGION_REQUIRED)))
    return out


def pack_region_table(regions: list[Region]) -> bytearray:
    buf = bytearray(REGION_TABLE_SIZE)
    _RT_HEADER.pack_into(buf, 0, b"regi", 0, len(regions), 0)
    for i, r in enumerate(regions):
        _RT_ENTRY.pack_into(buf, _RT_HEADER.size + i * _RT_ENTRY.size, r.guid.bytes_le, r.offset, r.length,
                            REGION_REQUIRED if r.required else 0)
    seal(buf)
    return buf


_MD_HEADER = struct.Struct("<8sHH20x")
_MD_ENTRY = struct.Struct("<16sIII4x")


@attrs.frozen
class MetadataItem:
    guid: uuid.UUID
    offset: int  # relative to the metadata region
    length: int
    flags: int


def parse_metadata_table(buf: bytes | memoryview) -> list[MetadataItem] | None:
    sig, _, count = _MD_HEADER.unpack_from(buf)
    if sig != b"metadata" or count > 2047:
        return None
    return [MetadataItem(guid(g), off, length, flags)
            for g, off, length, flags in (_MD_ENTRY.unpack_from(buf, _MD_HEADER.size + i * _MD_ENTRY.size)
                                          for i in range(count))]


def pack_metadata_table(items: list[MetadataItem]) -> bytearray:
    buf = bytearray(METADATA_TABLE_SIZE)
    _MD_HEADER.pack_into(buf, 0, b"metadata", 0, len(items))
    for i, it in enumerate(items):
        _MD_ENTRY.pack_into(buf, _MD_HEADER.size + i * _MD_ENTRY.size, it.guid.bytes_le, it.offset, it.length,
                            it.flags)
    return buf


# The log (§2.3 of the spec): 4 KiB sectors in a circular buffer.
LOG_ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")
LOG_DESCRIPTOR = struct.Struct("<4sIQQQ")  # signature, trailing/reserved, leading/zero-length, offset, sequence
LOG_DATA_HEAD = struct.Struct("<4sI")      # 'data', sequence high; then 4084 bytes; then sequence low
DESCRIPTORS_PER_SECTOR = LOG_SECTOR // LOG_DESCRIPTOR.size


def descriptor_sectors(count: int) -> int:
    """Sectors holding the entry header (two descriptor slots) and ``count`` descriptors: never 0."""
    return (count + 2 + DESCRIPTORS_PER_SECTOR - 1) // DESCRIPTORS_PER_SECTOR


@attrs.frozen
class LogEntryHeader:
    checksum: int
    entry_length: int
    tail: int
    sequence_number: int
    descriptor_count: int
    log_guid: uuid.UUID
    flushed_file_offset: int
    last_file_offset: int

    @classmethod
    def parse(cls, buf: bytes | memoryview) -> LogEntryHeader | None:
        sig, crc, length, tail, seq, count, _, lg, flushed, last = LOG_ENTRY_HEADER.unpack_from(buf)
        if sig != b"loge":
            return None
        return cls(crc, length, tail, seq, count, guid(lg), flushed, last)


def bat_entry(state: int, file_offset: int = 0) -> int:
    return (file_offset & BAT_OFFSET_MASK) | (state & BAT_STATE_MASK)


def chunk_ratio(block_size: int, logical_sector: int) -> int:
    """Payload blocks per sector-bitmap block."""
    return MAX_SECTORS_PER_BLOCK * logical_sector // block_size


def bat_entries(disk_size: int, block_size: int, logical_sector: int, has_parent: bool) -> int:
    ratio = chunk_ratio(block_size, logical_sector)
    data_blocks = -(-disk_size // block_size)
    bitmap_blocks = -(-data_blocks // ratio)
    if has_parent:
        return bitmap_blocks * (ratio + 1)
    return data_blocks + (data_blocks - 1) // ratio if data_blocks else 0


def div_round_up(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return div_round_up(a, b) * b
