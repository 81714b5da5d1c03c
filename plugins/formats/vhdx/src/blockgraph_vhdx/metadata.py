"""Reading and checking a VHDX image's headers, region table and metadata region into one ``Layout``."""

from __future__ import annotations

import itertools
import struct
import uuid
from typing import Any

import attrs
from blockgraph.errors import ImageCorrupt, NotSupported

from .structs import (
    BAT_GUID,
    BLOCK_SIZE_MAX,
    BLOCK_SIZE_MIN,
    FILE_PARAMETERS_GUID,
    FILE_SIGNATURE,
    HEADER_OFFSETS,
    HEADER_SECTION_END,
    HEADER_SIZE,
    LOGICAL_SECTOR_GUID,
    MAX_IMAGE_SIZE,
    META_IS_REQUIRED,
    METADATA_GUID,
    METADATA_TABLE_SIZE,
    PAGE83_GUID,
    PARAM_HAS_PARENT,
    PARAM_LEAVE_BLOCKS_ALLOCATED,
    PARENT_LOCATOR_GUID,
    PHYSICAL_SECTOR_GUID,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
    VIRTUAL_DISK_SIZE_GUID,
    Header,
    MiB,
    Region,
    chunk_ratio,
    parse_metadata_table,
    parse_region_table,
)

REQUIRED_ITEMS = {FILE_PARAMETERS_GUID: "file parameters", VIRTUAL_DISK_SIZE_GUID: "virtual disk size",
                  PAGE83_GUID: "page 83 data", LOGICAL_SECTOR_GUID: "logical sector size",
                  PHYSICAL_SECTOR_GUID: "physical sector size"}


@attrs.define
class Layout:
    headers: list[Header | None]
    current: int                   # index of the active header
    header_sectors: list[bytes]    # the raw 4 KiB sectors, to keep reserved bytes on rewrite
    bat: Region
    metadata: Region
    block_size: int
    leave_allocated: bool
    has_parent: bool
    disk_size: int
    logical_sector: int
    physical_sector: int
    page83: uuid.UUID
    parent_locator: dict[str, str] | None

    @property
    def header(self) -> Header:
        h = self.headers[self.current]
        assert h is not None
        return h

    @property
    def chunk_ratio(self) -> int:
        return chunk_ratio(self.block_size, self.logical_sector)


def _corrupt(filename: str, what: str) -> ImageCorrupt:
    return ImageCorrupt(f"VHDX image '{filename}': {what}")


async def read_headers(file: Any, filename: str) -> tuple[list[Header | None], int, list[bytes]]:
    sig = bytearray(8)
    await file.preadv(0, memoryview(sig))
    if bytes(sig) != FILE_SIGNATURE:
        raise _corrupt(filename, "not a VHDX file (no 'vhdxfile' signature)")
    raws, headers = [], []
    for off in HEADER_OFFSETS:
        raw = bytearray(HEADER_SIZE)
        await file.preadv(off, memoryview(raw))
        raws.append(bytes(raw))
        headers.append(Header.parse(raw))
    h1, h2 = headers
    if h1 is None and h2 is None:
        raise _corrupt(filename, "No valid VHDX header found")
    if h1 is not None and h2 is not None:
        if h1.sequence_number == h2.sequence_number and raws[0][:80] != raws[1][:80]:
            raise _corrupt(filename, "No valid VHDX header found (both headers have the same sequence number)")
        current = 0 if h1.sequence_number >= h2.sequence_number else 1
    else:
        current = 0 if h1 is not None else 1
    return headers, current, raws


def _check_no_overlap(regions: list[tuple[str, int, int]], filename: str) -> None:
    spans = sorted((off, off + length, name) for name, off, length in regions if length)
    for (_, end_a, name_a), (start_b, _, name_b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise _corrupt(filename, f"the {name_a} and the {name_b} overlap")


async def read_layout(file: Any, filename: str, headers: list[Header | None], current: int,
                      raws: list[bytes]) -> Layout:
    hdr = headers[current]
    assert hdr is not None
    tables = []
    for off in REGION_TABLE_OFFSETS:
        raw = bytearray(REGION_TABLE_SIZE)
        await file.preadv(off, memoryview(raw))
        tables.append(parse_region_table(raw))
    regions = tables[0] if tables[0] is not None else tables[1]
    if regions is None:
        raise _corrupt(filename, "no valid region table (bad signature or checksum in both copies)")
    bat = meta = None
    for r in regions:
        if r.guid == BAT_GUID:
            if bat is not None:
                raise _corrupt(filename, "the region table lists the BAT twice")
            bat = r
        elif r.guid == METADATA_GUID:
            if meta is not None:
                raise _corrupt(filename, "the region table lists the metadata region twice")
            meta = r
        elif r.required:
            raise NotSupported(f"VHDX image '{filename}' needs the unknown region {r.guid}")
    if bat is None or meta is None:
        raise _corrupt(filename, "the region table lacks the " + ("BAT" if bat is None else "metadata region"))
    file_len = file.getlength()
    for name, r in (("BAT", bat), ("metadata region", meta)):
        if r.offset < HEADER_SECTION_END or r.offset % MiB or r.offset + r.length > file_len:
            raise _corrupt(filename, f"the {name} at offset {r.offset} (length {r.length}) is outside the file "
                                     "or misaligned")
    if hdr.log_length and (hdr.log_offset < HEADER_SECTION_END or hdr.log_offset % MiB or hdr.log_length % MiB
                           or hdr.log_offset + hdr.log_length > file_len):
        raise _corrupt(filename, f"the log at offset {hdr.log_offset} (length {hdr.log_length}) is invalid")
    _check_no_overlap([("header section", 0, HEADER_SECTION_END), ("log", hdr.log_offset, hdr.log_length),
                       ("BAT", bat.offset, bat.length), ("metadata region", meta.offset, meta.length)], filename)
    if meta.length < METADATA_TABLE_SIZE:
        raise _corrupt(filename, "the metadata region is too small")
    table = bytearray(METADATA_TABLE_SIZE)
    await file.preadv(meta.offset, memoryview(table))
    items = parse_metadata_table(table)
    if items is None:
        raise _corrupt(filename, "the metadata table has no 'metadata' signature")
    found: dict[uuid.UUID, bytes] = {}
    for it in items:
        if it.guid in found:
            raise _corrupt(filename, f"the metadata item {it.guid} appears twice")
        if it.guid not in REQUIRED_ITEMS and it.guid != PARENT_LOCATOR_GUID:
            if it.flags & META_IS_REQUIRED:
                raise NotSupported(f"VHDX image '{filename}' needs the unknown metadata item {it.guid}")
            continue
        if it.offset < METADATA_TABLE_SIZE or it.offset + it.length > meta.length or it.length > MiB:
            raise _corrupt(filename, f"the metadata item {it.guid} lies outside the metadata region")
        raw = bytearray(it.length)
        await file.preadv(meta.offset + it.offset, memoryview(raw))
        found[it.guid] = bytes(raw)
    missing = [name for g, name in REQUIRED_ITEMS.items() if g not in found]
    if missing:
        raise _corrupt(filename, "the metadata lacks the " + ", ".join(missing))
    try:
        block_size, bits = struct.unpack_from("<II", found[FILE_PARAMETERS_GUID])
        (disk_size,) = struct.unpack_from("<Q", found[VIRTUAL_DISK_SIZE_GUID])
        (logical,) = struct.unpack_from("<I", found[LOGICAL_SECTOR_GUID])
        (physical,) = struct.unpack_from("<I", found[PHYSICAL_SECTOR_GUID])
        page83 = uuid.UUID(bytes_le=found[PAGE83_GUID][:16])
    except (struct.error, ValueError):
        raise _corrupt(filename, "a metadata item is shorter than its type") from None
    if not BLOCK_SIZE_MIN <= block_size <= BLOCK_SIZE_MAX or block_size & (block_size - 1):
        raise _corrupt(filename, f"invalid block size {block_size}")
    if logical not in (512, 4096) or physical not in (512, 4096):
        raise _corrupt(filename, f"invalid sector sizes (logical {logical}, physical {physical})")
    if disk_size % logical or disk_size > MAX_IMAGE_SIZE:
        raise _corrupt(filename, f"invalid virtual disk size {disk_size}")
    has_parent = bool(bits & PARAM_HAS_PARENT)
    locator = None
    if has_parent:
        if PARENT_LOCATOR_GUID not in found:
            raise _corrupt(filename, "a differencing image without a parent locator")
        from .locator import parse_locator

        locator = parse_locator(found[PARENT_LOCATOR_GUID], filename)
    return Layout(headers, current, raws, bat, meta, block_size, bool(bits & PARAM_LEAVE_BLOCKS_ALLOCATED),
                  has_parent, disk_size, logical, physical, page83, locator)
