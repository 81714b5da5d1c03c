"""``img create -f vmdk``: the same files, headers and descriptor text as qemu-img create."""

from __future__ import annotations

import random
from typing import Any

import attrs
from blockgraph.errors import OptionError
from blockgraph.options import one_of, opt, optional, parse_bool, parse_size, parse_str

from . import descriptor as dsc
from .format import (
    COMPRESSION_DEFLATE,
    FLAG_COMPRESS,
    FLAG_MARKER,
    FLAG_NL_DETECT,
    FLAG_RGD,
    FLAG_ZERO_GRAIN,
    SECTOR,
    SparseHeader,
)
from .paths import child_spec

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
              "streamOptimized")
ADAPTERS = ("ide", "buslogic", "lsilogic", "legacyESX")
SPLIT_SIZE = 0x80000000  # twoGbMaxExtent* extents hold at most 2 GiB
GRANULARITY = 128  # sectors: 64 KiB grains
GTES = 512


@attrs.frozen(kw_only=True)
class VmdkCreateOptions:
    # Declared in qemu-img's order, which the "Formatting ..." line follows.
    size: int = opt(converter=parse_size, help="Virtual disk size")
    adapter_type: str = opt("ide", converter=one_of(*ADAPTERS),
                            help="Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX")
    backing_file: str | None = opt(None, converter=optional(parse_str), help="File name of a base image")
    backing_fmt: str | None = opt(None, converter=optional(parse_str), help="Must be 'vmdk' if present")
    compat6: bool = opt(False, converter=parse_bool, help="VMDK version 6 image")
    hwversion: str = opt("undefined", converter=parse_str, help="VMDK hardware version")
    toolsversion: str | None = opt(None, converter=optional(parse_str), help="VMware guest tools version")
    subformat: str = opt("monolithicSparse", converter=one_of(*SUBFORMATS),
                         help="VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat "
                              "| twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ")
    zeroed_grain: bool = opt(False, converter=parse_bool,
                             help="Enable efficient zero writes using the zeroed-grain GTE feature")


def decompose(filename: str) -> tuple[str, str, str]:
    """(directory with its separator, name without the extension, extension with its dot), as QEMU splits it."""
    cut = filename.rfind("/")
    if cut < 0:
        cut = filename.rfind("\\")
    if cut < 0:
        cut = filename.rfind(":")
    path, base = filename[:cut + 1], filename[cut + 1:]
    dot = base.rfind(".")
    return (path, base, "") if dot < 0 else (path, base[:dot], base[dot:])


def sparse_layout(size: int, compress: bool, zeroed_grain: bool) -> tuple[int, list[tuple[int, bytes]]]:
    """(file size, [(offset, bytes)]) of an empty sparse extent of ``size`` bytes: header, both directories."""
    capacity = size // SECTOR
    grains = -(-capacity // GRANULARITY)
    gt_sectors = GTES * 4 // SECTOR
    gt_count = -(-grains // GTES)
    gd_sectors = -(-(gt_count * 4) // SECTOR)
    rgd = 1 + 20
    gd = rgd + gd_sectors + gt_sectors * gt_count
    grain_offset = -(-(gd + gd_sectors + gt_sectors * gt_count) // GRANULARITY) * GRANULARITY
    version = 3 if compress else 2 if zeroed_grain else 1
    flags = FLAG_RGD | FLAG_NL_DETECT | (FLAG_COMPRESS | FLAG_MARKER if compress else 0) | \
        (FLAG_ZERO_GRAIN if zeroed_grain else 0)
    hdr = SparseHeader(version, flags, capacity, GRANULARITY, 1, 20, GTES, rgd, gd, grain_offset,
                       COMPRESSION_DEFLATE if compress else 0)

    def directory(first_table: int) -> bytes:
        entries = b"".join((first_table + i * gt_sectors).to_bytes(4, "little") for i in range(gt_count))
        return entries.ljust(gd_sectors * SECTOR, b"\0")

    return grain_offset * SECTOR, [(0, hdr.pack()), (rgd * SECTOR, directory(rgd + gd_sectors)),
                                   (gd * SECTOR, directory(gd + gd_sectors))]


async def _write_file(session: Any, name: str, size: int, chunks: list[tuple[int, bytes]],
                      exact: int | None = None) -> None:
    """Create ``name`` with ``size`` bytes, write ``chunks``, and cut it to ``exact`` bytes when given."""
    from blockgraph.backend import BlockBackend

    registry = session.registry
    proto = registry.protocol_for(name) or "file"
    proto_cls = registry.driver(proto)
    await proto_cls.create(session, name, proto_cls.CreateOptions(size=size))
    if not chunks:
        return
    node = await session.open_node(child_spec(name, registry, False))
    blk = await BlockBackend.attach_new(session, node)
    try:
        for off, data in chunks:
            await blk.pwritev(off, memoryview(data))
        if exact is not None:
            await blk.truncate(exact)
        await blk.flush()
    finally:
        await blk.close()


async def _parent_cid(session: Any, filename: str, backing: str) -> int:
    """The CID of the backing file, which must be a vmdk image (opened without its own backing chain)."""
    from blockgraph.backing import full_backing_filename
    from blockgraph.node import close_node

    full = full_backing_filename(filename, backing, session.registry)
    node = await session.open_image(full, read_only=True, force_share=True)
    try:
        if node.driver_name != "vmdk":
            raise OptionError(f"Invalid backing file format: {node.driver_name}. Must be vmdk")
        return node.driver.cid
    finally:
        await close_node(node)


async def create(cls: type, session: Any, filename: str, o: VmdkCreateOptions) -> None:
    if o.backing_fmt is not None and o.backing_fmt != "vmdk":
        raise OptionError("backing_file must be a vmdk image")
    if not filename:
        raise OptionError("No filename provided")
    path, prefix, postfix = decompose(filename)
    size = -(-o.size // SECTOR) * SECTOR
    hw = None if o.hwversion == "undefined" else o.hwversion
    if o.compat6:
        if hw:
            raise OptionError("compat6 cannot be enabled with hwversion set")
        hw = "6"
    sub = o.subformat
    split = sub in ("twoGbMaxExtentFlat", "twoGbMaxExtentSparse")
    flat = sub in ("monolithicFlat", "twoGbMaxExtentFlat")
    compress = sub == "streamOptimized"
    if flat and o.backing_file:
        raise OptionError("Flat image can't have backing file")
    if flat and o.zeroed_grain:
        raise OptionError("Flat image can't enable zeroed grain")
    parent_cid = 0xFFFFFFFF
    if o.backing_file:
        parent_cid = await _parent_cid(session, filename, o.backing_file)
    line = 'RW {} FLAT "{}" 0\n' if flat else 'RW {} SPARSE "{}"\n'
    lines: list[str] = []
    files: list[tuple[str, int, list[tuple[int, bytes]]]] = []
    if not split and not flat:
        fsize, chunks = sparse_layout(size, compress, o.zeroed_grain)
        files.append((filename, fsize, chunks))
        lines.append(line.format(size // SECTOR, prefix + postfix))
    else:
        created, idx = 0, 1
        while created < size:
            cur = min(size - created, SPLIT_SIZE if split else size)
            name = f"{prefix}-{'f' if flat else 's'}{idx:03d}{postfix}" if split else f"{prefix}-flat{postfix}"
            if flat:
                files.append((path + name, cur, []))
            else:
                fsize, chunks = sparse_layout(cur, False, o.zeroed_grain)
                files.append((path + name, fsize, chunks))
            lines.append(line.format(cur // SECTOR, name))
            created += cur
            idx += 1
    text = dsc.render(cid=random.getrandbits(32), parent_cid=parent_cid, create_type=sub,
                      parent_hint=o.backing_file, extents=lines, hwversion=hw or "4", size=size,
                      adapter_type=o.adapter_type, toolsversion=o.toolsversion or "2147483647").encode()
    if not split and not flat:
        if len(text) > 20 * SECTOR:
            raise OptionError("the descriptor does not fit in the 20 sectors reserved for it")
        name, fsize, chunks = files[0]
        await _write_file(session, name, fsize, [*chunks, (SECTOR, text)])
        return
    await _write_file(session, filename, len(text), [(0, text)], exact=len(text))
    for name, fsize, chunks in files:
        await _write_file(session, name, fsize, chunks)
