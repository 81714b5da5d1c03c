"""``img create -f vhdx``: the same layout, defaults and refusals as qemu-img 7.2.

Layout: file identifier, two headers, two region tables, the log at 1 MiB, then the BAT and the metadata
region, each 1 MiB aligned; payload blocks start 5 MiB after the BAT, as QEMU places them.
"""

from __future__ import annotations

import os
import random
import struct
import uuid
from typing import Any

import attrs
from blockgraph.errors import OptionError
from blockgraph.options import one_of, opt, optional, parse_bool, parse_size, parse_str

from .structs import (
    BAT_GUID,
    BLOCK_SIZE_MAX,
    FILE_PARAMETERS_GUID,
    FILE_SIGNATURE,
    HEADER_OFFSETS,
    HEADER_SECTION_END,
    LOGICAL_SECTOR_GUID,
    MAX_IMAGE_SIZE,
    META_IS_REQUIRED,
    META_IS_VIRTUAL_DISK,
    METADATA_GUID,
    METADATA_TABLE_SIZE,
    PAGE83_GUID,
    PARAM_HAS_PARENT,
    PARAM_LEAVE_BLOCKS_ALLOCATED,
    PARENT_LOCATOR_GUID,
    PAYLOAD_FULLY_PRESENT,
    PAYLOAD_NOT_PRESENT,
    PAYLOAD_ZERO,
    PHYSICAL_SECTOR_GUID,
    REGION_TABLE_OFFSETS,
    VIRTUAL_DISK_SIZE_GUID,
    ZERO_GUID,
    GiB,
    Header,
    MetadataItem,
    MiB,
    Region,
    TiB,
    bat_entries,
    bat_entry,
    pack_metadata_table,
    pack_region_table,
    round_up,
)

CREATOR = "blockgraph"


@attrs.frozen(kw_only=True)
class VhdxCreateOptions:
    size: int = opt(converter=parse_size, help="Virtual disk size; max of 64TB.")
    log_size: int = opt(MiB, converter=parse_size, help="Log size; min 1MB.")
    block_size: int = opt(0, converter=parse_size,
                          help="Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.")
    subformat: str = opt("dynamic", converter=one_of("dynamic", "fixed"),
                         help="VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'.")
    block_state_zero: bool = opt(True, converter=parse_bool,
                                 help="Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do "
                                      "not set to 'off' when using 'qemu-img convert' with subformat=dynamic.")
    backing_file: str | None = opt(None, converter=optional(parse_str),
                                   help="Parent VHDX of a differencing image (a blockgraph extension)")
    backing_fmt: str | None = opt(None, converter=optional(parse_str), help="Image format of the parent (vhdx)")


def default_block_size(size: int) -> int:
    """QEMU's choice, meant to keep the BAT small enough to hold in memory."""
    if size > 32 * TiB:
        return 64 * MiB
    if size > 100 * GiB:
        return 32 * MiB
    if size > 1 * GiB:
        return 16 * MiB
    return 8 * MiB


def _sizes(o: VhdxCreateOptions) -> tuple[int, int, int]:
    size = round_up(o.size, 512)
    if size > MAX_IMAGE_SIZE:
        raise OptionError("Image size too large; max of 64TB")
    log_size = round_up(o.log_size, MiB)
    if log_size < MiB or log_size >= 1 << 32:
        raise OptionError("Log size must be a multiple of 1 MB")
    block = min(round_up(o.block_size, MiB), BLOCK_SIZE_MAX) if o.block_size else default_block_size(size)
    if block & (block - 1):
        raise OptionError("Block size must be a power of two")
    return size, log_size, block


async def _parent_locator(session: Any, filename: str, o: VhdxCreateOptions) -> bytes:
    from .locator import pack_locator

    if o.backing_fmt not in (None, "vhdx"):
        raise OptionError(f"The parent of a differencing VHDX must be a VHDX image, not '{o.backing_fmt}'")
    assert o.backing_file is not None
    from blockgraph.backing import full_backing_filename

    full = full_backing_filename(filename, o.backing_file, session.registry)
    parent = await session.open_image(full, fmt="vhdx", read_only=True, force_share=True)
    try:
        linkage = parent.driver.layout.header.data_write_guid
    finally:
        from blockgraph.node import close_node

        await close_node(parent)
    rel = o.backing_file if not os.path.isabs(o.backing_file) else os.path.relpath(
        o.backing_file, os.path.dirname(os.path.abspath(filename)))
    return pack_locator({"parent_linkage": "{" + str(linkage).upper() + "}",
                         "relative_path": ".\\" + rel.replace("/", "\\"),
                         "absolute_win32_path": os.path.abspath(full)})


async def create_image(session: Any, filename: str, o: VhdxCreateOptions) -> None:
    size, log_size, block = _sizes(o)
    fixed = o.subformat == "fixed"
    locator = await _parent_locator(session, filename, o) if o.backing_file else None
    if locator is not None and fixed:
        raise OptionError("A differencing VHDX cannot be fixed")
    proto = session.registry.protocol_for(filename) or "file"
    proto_cls = session.registry.driver(proto)
    await proto_cls.create(session, filename, proto_cls.CreateOptions(size=0))
    blk = await session.open_backend(filename, fmt=proto)
    try:
        # A differencing image's unwritten blocks come from the parent: they must not be ZERO blocks.
        zero_blocks = o.block_state_zero and locator is None
        await _write_layout(blk, size, log_size, block, fixed, zero_blocks, locator)
        await blk.flush()
    finally:
        await blk.close()


async def _write_layout(blk: Any, size: int, log_size: int, block: int, fixed: bool, zero_blocks: bool,
                        locator: bytes | None) -> None:
    async def write(off: int, data: bytes | bytearray) -> None:
        await blk.pwritev(off, memoryview(data))

    n = bat_entries(size, block, 512, locator is not None)
    bat_off = round_up(HEADER_SECTION_END + log_size, MiB)
    bat_len = round_up(n * 8, MiB)
    meta_off = round_up(bat_off + bat_len, MiB)
    data_off = bat_off + bat_len + 5 * MiB
    await blk.truncate(data_off + (size if fixed else 0))
    ident = FILE_SIGNATURE + CREATOR.encode("utf-16-le")
    await write(0, ident)
    seq = random.getrandbits(32)
    hdr = Header(seq, uuid.uuid4(), uuid.uuid4(), ZERO_GUID, 0, 1, log_size, HEADER_SECTION_END)
    await write(HEADER_OFFSETS[0], hdr.pack())
    await write(HEADER_OFFSETS[1], attrs.evolve(hdr, sequence_number=seq + 1).pack())

    if fixed or zero_blocks:
        state = PAYLOAD_ZERO if zero_blocks else PAYLOAD_FULLY_PRESENT if fixed else PAYLOAD_NOT_PRESENT
        bat = bytearray(bat_len)
        ratio = (1 << 23) * 512 // block
        for i in range(-(-size // block)):
            off = round_up(data_off + i * block, MiB) if state == PAYLOAD_FULLY_PRESENT else 0
            struct.pack_into("<Q", bat, (i + i // ratio) * 8, bat_entry(state, off))
        await write(bat_off, bat)
    table = pack_region_table([Region(BAT_GUID, bat_off, bat_len, False),
                               Region(METADATA_GUID, meta_off, MiB, False)])
    for off in REGION_TABLE_OFFSETS:
        await write(off, table)

    flags = (PARAM_LEAVE_BLOCKS_ALLOCATED if fixed else 0) | (PARAM_HAS_PARENT if locator else 0)
    values = [(FILE_PARAMETERS_GUID, struct.pack("<II", block, flags), META_IS_REQUIRED),
              (VIRTUAL_DISK_SIZE_GUID, struct.pack("<Q", size), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
              (PAGE83_GUID, uuid.uuid4().bytes_le, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
              (LOGICAL_SECTOR_GUID, struct.pack("<I", 512), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
              (PHYSICAL_SECTOR_GUID, struct.pack("<I", 512), META_IS_REQUIRED | META_IS_VIRTUAL_DISK)]
    if locator is not None:
        values.append((PARENT_LOCATOR_GUID, locator, META_IS_REQUIRED))
    items, blob, pos = [], bytearray(), METADATA_TABLE_SIZE
    for g, value, item_flags in values:
        items.append(MetadataItem(g, pos + len(blob), len(value), item_flags))
        blob += value
    await write(meta_off, pack_metadata_table(items))
    await write(meta_off + METADATA_TABLE_SIZE, blob)
