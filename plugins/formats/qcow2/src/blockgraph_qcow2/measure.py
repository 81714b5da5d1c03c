"""``img measure -O qcow2``: the file size a new qcow2 image needs (QEMU's qcow2_measure).

"fully allocated" is every data cluster plus all metadata a fully allocated image has (header, L2 tables,
L1 table, refcount blocks and table found as a fixed point); "required" drops the data clusters the source
does not allocate (all of them with a backing file; none with full/falloc preallocation). "bitmaps" is
reported when both sides keep persistent bitmaps (a v3 target, a qcow2 v3 source) and counts the
source's bitmaps as fully allocated in the new image.
"""

from __future__ import annotations

import struct
from typing import Any

from blockgraph.driver import MeasureResult, Status
from blockgraph.errors import BlockGraphError
from blockgraph.options import parse_bool, parse_size

from .constants import AUTOCLEAR_BITMAPS, EXTL2_MIN_CLUSTER, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Refcount blocks and table covering ``clusters`` and themselves (the fixed point QEMU computes)."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def prealloc_size(total: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """Bytes of a fully allocated image of virtual size ``total``, metadata included."""
    aligned = _round_up(total, cluster_size)
    l2e = 16 if extended_l2 else 8
    meta = cluster_size
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e
    nl1e = _round_up(nl2e * l2e // cluster_size, cluster_size // 8)
    meta += nl1e * 8
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)
    return meta + aligned


def parse_values(values: dict[str, str]) -> tuple[int, int, int, bool]:
    """(cluster size, version, refcount order, extended L2) with QEMU's refusals."""
    extl2 = parse_bool(values.get("extended_l2", "off"))
    cs = parse_size(values.get("cluster_size", "65536"))
    cbits = cs.bit_length() - 1
    if not MIN_CLUSTER_BITS <= cbits <= MAX_CLUSTER_BITS or 1 << cbits != cs:
        raise BlockGraphError(f"Cluster size must be a power of two between {1 << MIN_CLUSTER_BITS} and "
                              f"{1 << (MAX_CLUSTER_BITS - 10)}k")
    if extl2 and cs < EXTL2_MIN_CLUSTER:
        raise BlockGraphError(f"Extended L2 entries are only supported with cluster sizes of at least "
                              f"{EXTL2_MIN_CLUSTER} bytes")
    compat = values.get("compat")
    versions = {None: 3, "0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
    if compat not in versions:
        raise BlockGraphError(f"Invalid compatibility level: '{compat}'")
    version = versions[compat]
    bits = int(values.get("refcount_bits", "16"))
    if bits <= 0 or bits > 64 or bits & (bits - 1):
        raise BlockGraphError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and bits != 16:
        raise BlockGraphError("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                              "(use compat=1.1 or greater)")
    return cs, version, bits.bit_length() - 1, extl2


async def source_bitmaps_size(source: Any, cluster_size: int) -> int:
    """Space the source's persistent bitmaps take in a new image with ``cluster_size`` clusters."""
    from .header import bitmaps_ext

    img = getattr(source.driver, "img", None)
    ext = bitmaps_ext(img.h) if img is not None else None
    total = dir_size = 0
    if ext is not None and ext["nb_bitmaps"] and img.h.autoclear_features & AUTOCLEAR_BITMAPS \
            and ext["directory_size"] <= 64 << 20:
        d = bytearray(ext["directory_size"])
        await img.file.preadv(ext["directory_offset"], memoryview(d))
        pos = 0
        for _ in range(ext["nb_bitmaps"]):
            if pos + 24 > len(d):
                break
            _, _, _, _, gbits, name_size, extra = struct.unpack_from(">QIIBBHI", d, pos)
            pos += _round_up(24 + extra + name_size, 8)
            bits_needed = -(-img.h.size // (1 << gbits))
            nbytes = -(-bits_needed // 8)
            nclusters = -(-nbytes // cluster_size)
            total += nclusters * cluster_size + _round_up(nclusters * 8, cluster_size)
            dir_size += _round_up(24 + name_size, 8)
    return total + _round_up(dir_size, cluster_size)


async def _status(source: Any, offset: int, length: int) -> tuple[Status, int]:
    """Block status through the chain as QEMU's measure sees it: a format's own data clusters stay data even
    where its file has a hole (QEMU asks the file only for raw-like layers, which answer RECURSE)."""
    from blockgraph.io import block_status_above

    st, depth = await block_status_above(source, offset, length, None)
    flags, n = st.flags, st.length
    if flags & Status.ZERO and flags & Status.ALLOCATED:
        layer = source
        for _ in range(depth):
            layer = layer.cow_child().node
        if layer.caps is not None and layer.caps.block_status:
            own = await layer.driver.block_status(offset, n, True)
            if own.flags & Status.DATA and not own.flags & (Status.ZERO | Status.RECURSE):
                flags, n = Status.DATA | Status.ALLOCATED, max(1, min(n, own.length))
    return flags, n


async def measure(values: dict[str, str], size: int | None, source: Any) -> MeasureResult:
    if values.get("encrypt.format") or parse_bool(values.get("encryption", "off")):
        raise BlockGraphError("encrypted qcow2 images are not supported yet")
    cs, version, order, extl2 = parse_values(values)
    prealloc = values.get("preallocation", "off")
    vsize = _round_up(parse_size(values.get("size", "0")), cs)
    l2e = 16 if extl2 else 8
    if -(-(vsize // cs) // (cs // l2e)) * 8 > MAX_L1_BYTES:
        raise BlockGraphError("The image size is too large (try using a larger cluster size)")
    required = 0
    if source is not None:
        ssize = source.length
        vsize = _round_up(ssize, cs)
        if values.get("backing_file"):
            required = vsize
        else:
            offset = 0
            while offset < ssize:
                flags, pnum = await _status(source, offset, ssize - offset)
                if pnum <= 0:
                    break
                if flags & Status.ZERO:
                    pass
                elif flags & Status.DATA and flags & Status.ALLOCATED:
                    pnum = _round_up(offset + pnum, cs) - offset
                    required += offset % cs + pnum
                offset += pnum
    if prealloc in ("full", "falloc"):
        required = vsize
    fully = prealloc_size(vsize, cs, order, extl2)
    bitmaps = None
    if version >= 3 and source is not None and source.driver_name == "qcow2" \
            and getattr(getattr(source.driver, "img", None), "h", None) is not None \
            and source.driver.img.h.version >= 3:
        bitmaps = await source_bitmaps_size(source, cs)
    return MeasureResult(fully - vsize + required, fully, bitmaps)


class MeasureMixin:
    @classmethod
    async def measure(cls, values: dict[str, str], size: int | None, source: Any) -> MeasureResult:
        return await measure(values, size, source)
