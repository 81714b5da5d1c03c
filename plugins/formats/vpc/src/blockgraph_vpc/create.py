"""``img create -f vpc``: fixed and dynamic disks laid out as QEMU 7.2 lays them out.

Dynamic: footer copy at 0, dynamic header at 512, BAT at 1536 (all unallocated), footer at
the end. Fixed: the data, then the footer. Differencing disks (a parent named by locators)
are made by :func:`create_differencing`; qemu-img cannot create them.
"""

from __future__ import annotations

import os
from typing import Any

from blockgraph.errors import BlockGraphError, OptionError

from . import format as fmt
from .format import FOOTER_SIZE, SECTOR


class CreateError(BlockGraphError):
    """A refused ``img create`` (the message is qemu-img's)."""


async def _open_file(session: Any, filename: str) -> Any:
    proto = session.registry.protocol_for(filename) or "file"
    proto_cls = session.registry.driver(proto)
    fields = {"size": 0}
    await proto_cls.create(session, filename, proto_cls.CreateOptions(**fields))
    return await session.open_backend(filename, fmt=proto)


def plan(size: int, subformat: str, force_size: bool) -> tuple[tuple[int, int, int], int]:
    """(CHS geometry, total sectors) for a new image, or CreateError."""
    if subformat not in ("dynamic", "fixed"):
        raise OptionError(f"Parameter 'subformat' does not accept value '{subformat}'")
    size = (size + SECTOR - 1) // SECTOR * SECTOR
    chs, sectors = fmt.rounded_geometry(size, force_size)
    if sectors > fmt.MAX_SECTORS:
        raise CreateError("The image size is too large for file format 'vpc'")
    return chs, sectors


async def create(session: Any, filename: str, options: Any) -> None:
    try:
        chs, sectors = plan(options.size, options.subformat, options.force_size)
    except OptionError as e:
        raise CreateError(e.reason) from None
    total = sectors * SECTOR
    blk = await _open_file(session, filename)
    try:
        if options.subformat == "fixed":
            footer = fmt.new_footer(fmt.TYPE_FIXED, total, chs, options.force_size, fmt.NO_OFFSET)
            await blk.truncate(total + FOOTER_SIZE)
            await blk.pwritev(total, memoryview(footer.pack()))
        else:
            footer = fmt.new_footer(fmt.TYPE_DYNAMIC, total, chs, options.force_size, FOOTER_SIZE)
            await write_dynamic(blk, footer, fmt.DynHeader())
        await blk.flush()
    finally:
        await blk.close()


async def write_dynamic(blk: Any, footer: fmt.Footer, dyn: fmt.DynHeader,
                        locator_data: list[tuple[bytes, bytes]] | tuple = ()) -> None:
    """Footer, header, empty BAT, locator data, trailing footer; the BAT sized from the footer's size."""
    entries = -(-footer.current_size // dyn.block_size)
    bat_at = FOOTER_SIZE + fmt.DYN_HEADER_SIZE
    bat_len = (entries * 4 + SECTOR - 1) // SECTOR * SECTOR
    end = bat_at + bat_len
    dyn.table_offset, dyn.max_table_entries = bat_at, entries
    dyn.locators = []
    blobs = []
    for platform, data in locator_data:
        space = (len(data) + SECTOR - 1) // SECTOR * SECTOR
        dyn.locators.append(fmt.Locator(platform, space // SECTOR, len(data), end))
        blobs.append((end, data))
        end += space
    head = footer.pack()
    await blk.truncate(end + FOOTER_SIZE)
    await blk.pwritev(0, memoryview(head + dyn.pack()))
    await blk.pwritev(bat_at, memoryview(b"\xff" * bat_len))
    for at, data in blobs:
        await blk.pwritev(at, memoryview(data + bytes(-len(data) % SECTOR)))
    await blk.pwritev(end, memoryview(head))


async def create_differencing(session: Any, filename: str, parent: str,
                              locators: list[tuple[bytes, bytes]] | None = None) -> None:
    """A differencing disk over the VHD ``parent``.

    The parent is named relative to the new image's directory (W2ru) and absolute (W2ku), unless
    ``locators`` gives the (platform, data) pairs to store instead.
    """
    pblk = await session.open_backend(parent, fmt="vpc", read_only=True)
    try:
        pdrv = pblk.node.driver
        pfooter = pdrv.footer
        size = pdrv.size
    finally:
        await pblk.close()
    footer = fmt.new_footer(fmt.TYPE_DIFFERENCING, pfooter.current_size, (pfooter.cyls, pfooter.heads,
                                                                             pfooter.secs),
                            False, FOOTER_SIZE)
    footer.creator_app = pfooter.creator_app
    footer.current_size = footer.orig_size = max(size, pfooter.current_size)
    absolute = os.path.abspath(parent)
    relative = os.path.relpath(absolute, os.path.dirname(os.path.abspath(filename)))
    dyn = fmt.DynHeader(parent_uuid=pfooter.uuid, parent_timestamp=pfooter.timestamp,
                        parent_name=os.path.basename(parent).encode("utf-16-be")[:512].ljust(512, b"\0"))
    rel_win = (".\\" + relative.replace("/", "\\")).encode("utf-16-le")
    abs_win = absolute.replace("/", "\\").encode("utf-16-le")
    blk = await _open_file(session, filename)
    try:
        if locators is None:
            locators = [(fmt.PLAT_W2KU, abs_win), (fmt.PLAT_W2RU, rel_win)]
        await write_dynamic(blk, footer, dyn, locators)
        await blk.flush()
    finally:
        await blk.close()
