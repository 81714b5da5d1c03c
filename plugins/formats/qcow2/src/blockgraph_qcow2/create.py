"""``qemu-img create -f qcow2``: validation with QEMU's texts, the initial three clusters, then resize.

Layout as qemu-img 7.2: cluster 0 header, 1 refcount table, 2 first refcount block (refcounts of 0-2 are 1),
then the image is opened and grown to its size, which puts the L1 table at cluster 3.
"""

from __future__ import annotations

import struct
from typing import Any

import attrs
from blockgraph.driver import PreallocMode
from blockgraph.errors import OptionError

from .constants import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    EXT_FEATURE_TABLE,
    EXTL2_MIN_CLUSTER,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2,
    QEMU_V3_HEADER_LEN,
    V2_HEADER_LEN,
)
from .header import Extension, Header, feature_table
from .options import Qcow2CreateOptions, compat_version

V3_NEEDED = "only supported with compatibility level 1.1 and above (use version=v3 or greater)"


def validate(o: Qcow2CreateOptions) -> int:
    """The header version, or OptionError with QEMU's message."""
    if o.encryption or o.encrypt_format:
        raise OptionError("encrypted images are not supported yet (qcow2 encryption is not implemented)")
    version = compat_version(o.compat)
    cs = o.cluster_size
    if cs < 512 or cs > 2 << 20 or cs & (cs - 1):
        raise OptionError("Cluster size must be a power of two between 512 and 2048k")
    rb = o.refcount_bits
    if rb < 1 or rb > 64 or rb & (rb - 1):
        raise OptionError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3:
        if rb != 16:
            raise OptionError("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                              "(use version=v3 or greater)")
        if o.lazy_refcounts:
            raise OptionError(f"Lazy refcounts {V3_NEEDED}")
        if o.compression_type != "zlib":
            raise OptionError(f"Non-zlib compression type is {V3_NEEDED}")
        if o.data_file:
            raise OptionError(f"External data files are {V3_NEEDED}")
        if o.extended_l2:
            raise OptionError(f"Extended L2 entries are {V3_NEEDED}")
    if o.backing_fmt and not o.backing_file:
        raise OptionError("Backing format cannot be used without backing file")
    if o.data_file_raw and not o.data_file:
        raise OptionError("data-file-raw requires data-file")
    if o.data_file_raw and o.backing_file:
        raise OptionError("Backing file and data-file-raw cannot be used at the same time")
    if o.extended_l2 and cs < EXTL2_MIN_CLUSTER:
        raise OptionError(f"Extended L2 entries are only supported with cluster sizes of at least "
                          f"{EXTL2_MIN_CLUSTER} bytes")
    if o.backing_file and o.preallocation != "off" and not o.extended_l2:
        raise OptionError("Backing file and preallocation can only be used at the same time if extended_l2 is on")
    return version


def initial_header(o: Qcow2CreateOptions, version: int) -> Header:
    cs = o.cluster_size
    h = Header(version=version, cluster_bits=cs.bit_length() - 1, refcount_table_offset=cs,
               refcount_table_clusters=1, refcount_order=o.refcount_bits.bit_length() - 1,
               header_length=QEMU_V3_HEADER_LEN if version >= 3 else V2_HEADER_LEN)
    if version >= 3:
        if o.extended_l2:
            h.incompatible_features |= INCOMPAT_EXTL2
        if o.compression_type == "zstd":
            h.incompatible_features |= INCOMPAT_COMPRESSION
            h.compression_type = 1
        if o.lazy_refcounts:
            h.compatible_features |= COMPAT_LAZY_REFCOUNTS
        if o.data_file:
            h.incompatible_features |= INCOMPAT_DATA_FILE
            h.extensions.append(Extension(EXT_DATA_FILE, o.data_file.encode()))
            if o.data_file_raw:
                h.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW
        if cs > 4096:  # QEMU leaves the table out of small clusters, to keep room for a backing file name
            h.extensions.append(Extension(EXT_FEATURE_TABLE, feature_table()))
    return h


async def _create_protocol_file(session: Any, filename: str, size: int) -> None:
    proto = session.registry.protocol_for(filename) or "file"
    proto_cls = session.registry.driver(proto)
    fields = {f.name for f in attrs.fields(proto_cls.CreateOptions)}
    values = {"size": size}
    await proto_cls.create(session, filename, proto_cls.CreateOptions(**{k: v for k, v in values.items()
                                                                          if k in fields}))


def _file_spec(session: Any, filename: str) -> dict[str, Any]:
    proto = session.registry.protocol_for(filename) or "file"
    parse = getattr(session.registry.driver(proto), "parse_filename", None)
    return {"driver": proto, **(parse(filename) if parse else {"filename": filename})}


async def create_image(session: Any, filename: str, o: Qcow2CreateOptions) -> None:
    from blockgraph.node import close_node

    version = validate(o)
    size = -(-o.size // 512) * 512
    h = initial_header(o, version)
    cs = h.cluster_size
    await _create_protocol_file(session, filename, 0)
    data_spec = None
    if o.data_file:
        data_path = o.data_file  # relative to the working directory, as qemu-img creates and opens it
        await _create_protocol_file(session, data_path, size)
        data_spec = _file_spec(session, data_path)
    file_node = await session.open_node(_file_spec(session, filename))
    try:
        from blockgraph import io

        cluster0 = bytearray(cs)
        packed = h.pack()
        cluster0[:len(packed)] = packed
        table = bytearray(cs)
        struct.pack_into(">Q", table, 0, 2 * cs)
        block = bytearray(cs)
        bits = o.refcount_bits
        for c in range(3):  # refcount 1 for clusters 0..2, entries LSB-first within bytes for narrow widths
            bit = c * bits
            if bits >= 8:
                block[bit // 8 + bits // 8 - 1] = 1
            else:
                block[bit // 8] |= 1 << (bit % 8)
        await io.pwritev(file_node, 0, memoryview(bytes(cluster0[:max(len(packed), 512)])))
        await io.pwritev(file_node, cs, memoryview(bytes(table)))
        await io.pwritev(file_node, 2 * cs, memoryview(bytes(block)))
        await io.flush(file_node)
    finally:
        await close_node(file_node)
    spec: dict[str, Any] = {"driver": "qcow2", "file": _file_spec(session, filename)}
    if data_spec is not None:
        spec["data-file"] = data_spec
    node = await session.open_node(spec)
    from blockgraph.backend import BlockBackend

    blk = await BlockBackend.attach_new(session, node)  # takes write and resize on the whole graph
    try:
        drv = node.driver
        mode = PreallocMode(o.preallocation)
        if o.data_file_raw and mode is PreallocMode.OFF:
            mode = PreallocMode.METADATA
        if size:
            await drv.truncate(size, False, mode)
            node.length = size
        if o.backing_file:
            drv.img.h.backing_file = o.backing_file
            if o.backing_fmt:
                drv.img.h.set_ext(EXT_BACKING_FORMAT, o.backing_fmt.encode())
            await drv.img.write_header()
        from blockgraph import io

        await io.flush(node)
    finally:
        await blk.close()
        if not node.closed:
            await close_node(node)
