"""The generic I/O layer between callers and drivers (QEMU's block/io.c).

Alignment with read-modify-write, serialisation of overlapping RMW, splitting
by max transfer, zero detection, write-zeroes and discard fallbacks, FUA
emulation, copy-on-read, block-status recursion, flush ordering and drain all
happen here, once, so that no driver repeats them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from .bitmaps import set_dirty
from .driver import BlockStatus, DriverKind, PreallocMode, ReqFlags, Status
from .errors import BlockIOError, NotSupported

if TYPE_CHECKING:
    from .node import Node

FUA, MAY_UNMAP, NO_FALLBACK = ReqFlags.FUA, ReqFlags.MAY_UNMAP, ReqFlags.NO_FALLBACK
ZERO_WRITE, WRITE_UNCHANGED, COPY_ON_READ = ReqFlags.ZERO_WRITE, ReqFlags.WRITE_UNCHANGED, ReqFlags.COPY_ON_READ
CORE_FLAGS = ZERO_WRITE | COPY_ON_READ | NO_FALLBACK
ZERO_CHUNK = 1 << 20
_ZEROS = bytes(ZERO_CHUNK)
_ZERO_VIEW = memoryview(_ZEROS)


def is_zero(buf: memoryview) -> bool:
    """True when every byte of ``buf`` is zero; rejects the common case after two bytes."""
    n = len(buf)
    if n == 0:
        return True
    if buf[0] or buf[n - 1]:
        return False
    for pos in range(0, n, ZERO_CHUNK):
        chunk = buf[pos:pos + ZERO_CHUNK]
        if bytes(chunk) != (_ZEROS if len(chunk) == ZERO_CHUNK else bytes(len(chunk))):
            return False
    return True


def _fill_zero(buf: memoryview) -> None:
    for pos in range(0, len(buf), ZERO_CHUNK):
        chunk = buf[pos:pos + ZERO_CHUNK]
        chunk[:] = _ZERO_VIEW[:len(chunk)]


def sector_length(length: int) -> int:
    """Lengths are whole 512-byte sectors, as QEMU's block layer counts them (a 1000-byte file is 1 KiB)."""
    return -(-length // 512) * 512


def zero_view(length: int) -> memoryview:
    """A read-only view of ``length`` zero bytes (at most :data:`ZERO_CHUNK`)."""
    return _ZERO_VIEW[:length]


class BlockChunk(NamedTuple):
    """The part of a request inside one fixed-size block of a format (see :func:`block_chunks`)."""

    pos: int  # where the part starts in the request's buffer
    offset: int  # its guest offset
    block: int  # the block's index
    within: int  # its offset inside the block
    length: int


def block_chunks(offset: int, length: int, block_size: int) -> Iterator[BlockChunk]:
    """Split the guest range ``[offset, offset+length)`` at ``block_size`` boundaries (vdi, vpc, vhdx blocks)."""
    pos = 0
    while pos < length:
        block, within = divmod(offset + pos, block_size)
        n = min(length - pos, block_size - within)
        yield BlockChunk(pos, offset + pos, block, within, n)
        pos += n


# ---------------------------------------------------------------- tracked requests


class Tracked:
    """An in-flight request; serialising ones exclude every overlapping request."""

    __slots__ = ("done", "end", "serialising", "start", "waiting_for")

    def __init__(self, start: int, end: int, serialising: bool) -> None:
        self.start, self.end, self.serialising = start, end, serialising
        self.waiting_for: Tracked | None = None
        self.done: asyncio.Future | None = None


def _begin(node: Node, start: int, end: int, serialising: bool = False) -> Tracked:
    req = Tracked(start, end, serialising)
    node.tracked.add(req)
    node.in_flight += 1
    if serialising:
        node.serialising += 1
    return req


def _end(node: Node, req: Tracked) -> None:
    node.tracked.discard(req)
    node.in_flight -= 1
    if req.serialising:
        node.serialising -= 1
    if req.done is not None and not req.done.done():
        req.done.set_result(None)
    if node.in_flight == 0 and node.drained is not None:
        node.drained.set()


async def _wait_overlaps(node: Node, req: Tracked) -> None:
    """Wait for overlapping requests when either side is serialising (QEMU's rule).

    A request that is itself waiting is skipped: it will wait for us, and
    waiting for it would deadlock.
    """
    while True:
        for other in node.tracked:
            if other is req or not (req.serialising or other.serialising):
                continue
            if other.start < req.end and req.start < other.end and other.waiting_for is None:
                if other.done is None:
                    other.done = asyncio.get_running_loop().create_future()
                req.waiting_for = other
                try:
                    await asyncio.shield(other.done)
                finally:
                    req.waiting_for = None
                break
        else:
            return


def _mark_serialising(node: Node, req: Tracked, start: int, end: int) -> None:
    if not req.serialising:
        req.serialising = True
        node.serialising += 1
    req.start, req.end = min(req.start, start), max(req.end, end)


async def drain(node: Node) -> None:
    """Wait until no request is in flight on ``node`` or below it."""
    while node.in_flight:
        if node.drained is None or node.drained.is_set():
            node.drained = asyncio.Event()  # shared by every drainer of this node
        await node.drained.wait()
    for c in list(node.children.values()):
        await drain(c.node)


def _above(node: Node) -> tuple[list[Node], list[Any]]:
    """Every node above ``node`` (itself included) and every non-node user attached above it."""
    nodes: list[Node] = []
    users: list[Any] = []
    todo = [node]
    while todo:
        n = todo.pop()
        if any(n is m for m in nodes):
            continue
        nodes.append(n)
        for edge in n.parents:
            parent = edge.parent
            if hasattr(parent, "parents"):
                todo.append(parent)
            elif hasattr(parent, "quiesce") and not any(parent is u for u in users):
                users.append(parent)
    return nodes, users


@contextlib.asynccontextmanager
async def drained(node: Node) -> AsyncIterator[None]:
    """A drained section (bdrv_drained_begin/end): every user above ``node`` holds new requests,
    and the body runs once nothing is in flight on ``node``, above it or below it."""
    nodes, users = _above(node)
    for user in users:
        user.quiesce()
    try:
        for n in nodes:
            await drain(n)
        yield
    finally:
        for user in users:
            user.unquiesce()


# ---------------------------------------------------------------- read


async def preadv(node: Node, offset: int, buf: memoryview, flags: ReqFlags = ReqFlags.NONE) -> None:
    n = len(buf)
    if not n:
        return
    req = _begin(node, offset, offset + n)
    try:
        if flags and flags & COPY_ON_READ:  # `flags and`: IntFlag operations cost ~1 us each
            await _copy_on_read(node, req, offset, buf, flags)
        else:
            if node.serialising:
                await _wait_overlaps(node, req)
            lim = node.limits
            align, mt = lim.request_alignment, lim.max_transfer
            if (not flags and node.lock is None and offset + n <= node.length
                    and (align == 1 or not (offset % align or n % align)) and (not mt or n <= mt)):
                # What _read_padded and _read_aligned would end in, without their two frames per node
                # (in a 16-image chain a 4 KiB read crosses 32 nodes).
                await node.driver.preadv(offset, buf, flags)
            else:
                await _read_padded(node, offset, buf, flags)
    finally:
        _end(node, req)


async def _read_padded(node: Node, offset: int, buf: memoryview, flags: ReqFlags) -> None:
    """Read any range: unaligned edges go through a bounce buffer widened to the request alignment."""
    n = len(buf)
    align = node.limits.request_alignment
    if align > 1 and (offset % align or n % align):
        head = offset % align
        start = offset - head
        bounce = memoryview(bytearray(_round_up(offset + n, align) - start))
        await _read_aligned(node, start, bounce, flags)
        buf[:] = bounce[head:head + n]
    else:
        await _read_aligned(node, offset, buf, flags)


async def _read_aligned(node: Node, offset: int, buf: memoryview, flags: ReqFlags) -> None:
    drv, lock, mt = node.driver, node.lock, node.limits.max_transfer
    if flags:
        flags &= ~CORE_FLAGS
    n = len(buf)
    if offset + n > node.length:
        # Past the end reads as zeros; the driver sees at most the aligned remainder (bdrv_aligned_preadv).
        keep = min(n, _round_up(max(node.length - offset, 0), node.limits.request_alignment))
        _fill_zero(buf[keep:])
        buf, n = buf[:keep], keep
        if not n:
            return
    if not mt or n <= mt:
        if lock is None:
            await drv.preadv(offset, buf, flags)
        else:
            async with lock:
                await drv.preadv(offset, buf, flags)
        return
    for pos in range(0, n, mt):
        chunk = buf[pos:pos + mt]
        if lock is None:
            await drv.preadv(offset + pos, chunk, flags)
        else:
            async with lock:
                await drv.preadv(offset + pos, chunk, flags)


async def _copy_on_read(node: Node, req: Tracked, offset: int, buf: memoryview, flags: ReqFlags) -> None:
    """Read through and write what the node does not hold itself into it (bdrv_co_do_copy_on_readv)."""
    cluster = max(int(getattr(node.driver, "cluster_size", 0) or 65536), node.limits.request_alignment)
    start = offset - offset % cluster
    end = min(_round_up(offset + len(buf), cluster), _round_up(node.length, node.limits.request_alignment))
    _mark_serialising(node, req, start, end)
    await _wait_overlaps(node, req)
    pos = start
    while pos < end:
        st = await block_status(node, pos, end - pos, want_zero=False)
        if st.length <= 0:  # end of the node: the rest reads as zeros
            lo = max(pos, offset)
            if offset + len(buf) > lo:
                _fill_zero(buf[lo - offset:])
            break
        length = min(st.length, end - pos)
        lo, hi = max(pos, offset), min(pos + length, offset + len(buf))
        if st.flags & Status.ALLOCATED or not node.caps.write or node.read_only:
            if hi > lo:
                await _read_padded(node, lo, buf[lo - offset:hi - offset], flags)
        else:
            bounce = memoryview(bytearray(length))
            await _read_aligned(node, pos, bounce, flags)
            if is_zero(bounce):
                await _zeroes_aligned(node, pos, length, WRITE_UNCHANGED)
            else:
                await _write_aligned(node, pos, bounce, WRITE_UNCHANGED)
            if hi > lo:
                buf[lo - offset:hi - offset] = bounce[lo - pos:hi - pos]
        pos += length


# ---------------------------------------------------------------- write


def _round_up(x: int, align: int) -> int:
    return (x + align - 1) // align * align


def _check_writable(node: Node, offset: int, length: int) -> None:
    if node.read_only:
        raise BlockIOError(errno.EPERM, node=node.name, op="write", offset=offset, length=length,
                           detail="Block node is read-only")


def _grown(node: Node, end: int) -> None:
    """A write past the end makes the node longer (bdrv_co_write_req_finish)."""
    if end > node.length:
        node.length = end


async def pwritev(node: Node, offset: int, buf: memoryview, flags: ReqFlags = ReqFlags.NONE) -> None:
    n = len(buf)
    if not n:
        return
    _check_writable(node, offset, n)
    if node.detect_zeroes != "off" and not flags & ZERO_WRITE and is_zero(buf):
        zflags = flags | ZERO_WRITE
        if node.detect_zeroes == "unmap":
            zflags |= MAY_UNMAP
        await pwrite_zeroes(node, offset, n, zflags)
        return
    align = node.limits.request_alignment
    req = _begin(node, offset, offset + n)
    try:
        if align > 1 and (offset % align or n % align):
            await _rmw(node, req, offset, buf, align, flags)
        else:
            if node.serialising:
                await _wait_overlaps(node, req)
            await _write_aligned(node, offset, buf, flags)
        _grown(node, offset + n)
    finally:
        if node.dirty_bitmaps:  # as bdrv_co_write_req_finish: marked even when the write failed
            set_dirty(node, offset, n)
        _end(node, req)


async def _rmw(node: Node, req: Tracked, offset: int, buf: memoryview, align: int, flags: ReqFlags) -> None:
    """Widen an unaligned write to whole blocks; overlapping requests wait (they would tear it)."""
    n = len(buf)
    head = offset % align
    start = offset - head
    end = _round_up(offset + n, align)
    _mark_serialising(node, req, start, end)
    await _wait_overlaps(node, req)
    bounce = memoryview(bytearray(end - start))
    await _read_aligned(node, start, bounce[:align], ReqFlags.NONE)
    if end - align > start:
        await _read_aligned(node, end - align, bounce[end - start - align:], ReqFlags.NONE)
    bounce[head:head + n] = buf
    await _write_aligned(node, start, bounce, flags)


async def _write_aligned(node: Node, offset: int, buf: memoryview, flags: ReqFlags) -> None:
    drv, lock, mt = node.driver, node.lock, node.limits.max_transfer
    if flags:
        supported = getattr(drv, "supported_write_flags", ReqFlags.NONE)
        emulate_fua = bool(flags & FUA) and not supported & FUA
        dflags = flags & supported
    else:
        emulate_fua, dflags = False, flags
    n = len(buf)
    step = mt or n
    for pos in range(0, n, step):
        chunk = buf[pos:pos + step] if step < n else buf
        if lock is None:
            await drv.pwritev(offset + pos, chunk, dflags)
        else:
            async with lock:
                await drv.pwritev(offset + pos, chunk, dflags)
    node.write_gen += 1
    if emulate_fua:
        await flush(node)


async def pwrite_zeroes(node: Node, offset: int, length: int, flags: ReqFlags = ReqFlags.NONE) -> None:
    if length <= 0:
        return
    _check_writable(node, offset, length)
    if not node.discard_unmap:
        flags &= ~MAY_UNMAP
    align = node.limits.request_alignment
    head = offset % align
    tail = (offset + length) % align
    if head or tail:
        # Unaligned edges are written as explicit zeros through read-modify-write.
        if head:
            first = min(align - head, length)
            await _zero_bytes(node, offset, first, flags)
            offset, length = offset + first, length - first
        if length and (offset + length) % align:
            last = (offset + length) % align
            await _zero_bytes(node, offset + length - last, last, flags)
            length -= last
        if not length:
            return
    req = _begin(node, offset, offset + length)
    try:
        if node.serialising:
            await _wait_overlaps(node, req)
        await _zeroes_aligned(node, offset, length, flags)
        _grown(node, offset + length)
    finally:
        if node.dirty_bitmaps:
            set_dirty(node, offset, length)
        _end(node, req)


async def _zero_bytes(node: Node, offset: int, length: int, flags: ReqFlags) -> None:
    if flags & NO_FALLBACK:
        raise NotSupported(f"node '{node.name}': unaligned write-zeroes needs a fallback")
    await pwritev(node, offset, zero_view(length), (flags | ZERO_WRITE) & ~MAY_UNMAP)


async def _zeroes_aligned(node: Node, offset: int, length: int, flags: ReqFlags) -> None:
    drv, lock, lim = node.driver, node.lock, node.limits
    if node.caps.zero:
        zflags = getattr(drv, "supported_zero_flags", ReqFlags.NONE)
        emulate_fua = bool(flags & FUA) and not zflags & FUA
        strip = CORE_FLAGS & ~(zflags & NO_FALLBACK)  # a driver that declares NO_FALLBACK sees it (NBD FAST_ZERO)
        dflags = flags & ~(strip | FUA) if emulate_fua else flags & ~strip
        zalign = max(lim.pwrite_zeroes_alignment, 1)
        zmax = lim.max_pwrite_zeroes or (1 << 62)
        zmax -= zmax % zalign
        end = offset + length
        pos = offset
        try:
            while pos < end:
                if pos % zalign:
                    step = min(zalign - pos % zalign, end - pos)
                    await _zero_fallback(node, pos, step, flags)
                elif end - pos < zalign:
                    step = end - pos
                    await _zero_fallback(node, pos, step, flags)
                else:
                    step = min(zmax, (end - pos) - (end - pos) % zalign)
                    if lock is None:
                        await drv.pwrite_zeroes(pos, step, dflags)
                    else:
                        async with lock:
                            await drv.pwrite_zeroes(pos, step, dflags)
                pos += step
            node.write_gen += 1
            if emulate_fua:
                await flush(node)
            return
        except NotSupported:
            offset, length = pos, end - pos
    await _zero_fallback(node, offset, length, flags)


async def _zero_fallback(node: Node, offset: int, length: int, flags: ReqFlags) -> None:
    """Write zeros from a shared buffer, unless the caller forbids the slow path."""
    if flags & NO_FALLBACK:
        raise NotSupported(f"node '{node.name}' cannot write zeroes efficiently")
    step = min(node.limits.max_transfer or ZERO_CHUNK, ZERO_CHUNK)
    wflags = (flags | ZERO_WRITE) & ~(MAY_UNMAP | NO_FALLBACK)
    for pos in range(offset, offset + length, step):
        await _write_aligned(node, pos, zero_view(min(step, offset + length - pos)), wflags)


async def pdiscard(node: Node, offset: int, length: int) -> None:
    """Deallocate; unaligned head and tail are dropped, as are discards the node ignores."""
    _check_writable(node, offset, length)
    if not node.discard_unmap or not node.caps.discard:
        return
    lim = node.limits
    align = max(lim.pdiscard_alignment, lim.request_alignment, 1)
    start = _round_up(offset, align)
    end = (offset + length) // align * align
    if end <= start:
        return
    step = lim.max_pdiscard or (end - start)
    step -= step % align if step > align else 0
    req = _begin(node, start, end)
    try:
        if node.serialising:
            await _wait_overlaps(node, req)
        for pos in range(start, end, step):
            try:
                if node.lock is None:
                    await node.driver.pdiscard(pos, min(step, end - pos))
                else:
                    async with node.lock:
                        await node.driver.pdiscard(pos, min(step, end - pos))
            except NotSupported:
                return
        node.write_gen += 1
    finally:
        if node.dirty_bitmaps:
            set_dirty(node, offset, length)
        _end(node, req)


# ---------------------------------------------------------------- flush, truncate


async def flush(node: Node) -> None:
    """Metadata to the OS, then the disk sync (unless cache.no-flush), then children that were written."""
    async with node.flush_lock:
        gen = node.write_gen
        drv = node.driver
        if node.caps.flush_to_os:
            await drv.flush_to_os()
        if not node.no_flush and gen != node.flushed_gen and node.caps.write:
            if node.lock is None:
                await drv.flush()
            else:
                async with node.lock:
                    await drv.flush()
        node.flushed_gen = gen
    for c in list(node.children.values()):
        if c.perm & 0x06:  # WRITE | WRITE_UNCHANGED
            await flush(c.node)


async def truncate(node: Node, length: int, exact: bool, prealloc: PreallocMode) -> None:
    if not node.caps.truncate:
        raise BlockIOError(errno.ENOTSUP, node=node.name, op="truncate",
                           detail="Image format driver does not support resize")
    await drain(node)
    await node.driver.truncate(length, exact, prealloc)
    node.length = sector_length(await node.driver.getlength())
    node.write_gen += 1


# ---------------------------------------------------------------- block status


async def block_status(node: Node, offset: int, length: int, want_zero: bool = True) -> BlockStatus:
    """The status of the extent starting at ``offset`` (at most ``length`` bytes) as this node sees it."""
    total = node.length
    if offset >= total:
        return BlockStatus(Status.EOF, 0)
    length = min(length, total - offset)
    caps = node.caps
    if not caps.block_status:
        child = node.filtered
        if child is not None and node.kind is DriverKind.FILTER:
            st = await block_status(child.node, offset, length, want_zero)
        elif node.kind is DriverKind.PROTOCOL:
            st = BlockStatus(Status.DATA | Status.OFFSET_VALID | Status.ALLOCATED, length, offset, node)
        else:
            st = BlockStatus(Status.DATA | Status.ALLOCATED, length)
    else:
        st = await node.driver.block_status(offset, length, want_zero)
        if st.length <= 0 or st.length > length:
            st = BlockStatus(st.flags, max(1, min(st.length, length)) if st.length > 0 else length,
                             st.offset, st.file)
    flags = st.flags
    if flags & Status.RECURSE and not flags & Status.DATA:  # BDRV_BLOCK_RAW: the file answers for us
        inner = await block_status(st.file, st.offset, st.length, want_zero)
        if inner.flags & Status.EOF and inner.length == 0:
            inner = BlockStatus(Status.ZERO, st.length)
        st = BlockStatus(inner.flags & ~Status.EOF, min(inner.length, st.length), inner.offset, inner.file)
        flags = st.flags
    elif (want_zero and flags & Status.RECURSE and flags & Status.DATA and flags & Status.OFFSET_VALID
          and st.file is not None and st.file is not node and not flags & Status.ZERO):
        # BDRV_BLOCK_RECURSE: only then does QEMU ask the file where the data reads as zeros.
        inner = await block_status(st.file, st.offset, st.length, want_zero)
        if inner.flags & Status.EOF and (inner.length == 0 or inner.flags & Status.ZERO):
            st = BlockStatus(flags | Status.ZERO, st.length, st.offset, st.file)  # past the file's end: zeros
        else:  # limited to what the file reported on, as bdrv_co_block_status does
            st = BlockStatus(flags | (inner.flags & Status.ZERO), min(inner.length, st.length) or st.length,
                             st.offset, st.file)
        flags = st.flags
    flags &= ~Status.RECURSE  # a request to this function, not a status
    if flags & (Status.DATA | Status.ZERO):
        flags |= Status.ALLOCATED
    elif want_zero and node.cow_child() is not None and offset >= node.cow_child().node.length:
        flags |= Status.ZERO
    elif getattr(node.driver, "supports_backing", False) and node.cow_child() is None:
        flags |= Status.ZERO  # unallocated without a backing file reads zeros (bdrv_co_block_status)
    if offset + st.length >= total:
        flags |= Status.EOF
    if flags != st.flags:
        st = BlockStatus(flags, st.length, st.offset, st.file)
    return st


async def block_status_above(node: Node, offset: int, length: int, base: Node | None = None,
                             want_zero: bool = True) -> tuple[BlockStatus, int]:
    """Status through the backing chain down to (excluding) ``base``, with the depth of the answering layer."""
    depth = 0
    cur = node
    while True:
        st = await block_status(cur, offset, length, want_zero)
        if st.flags & Status.ALLOCATED or st.length == 0:
            return st, depth
        nxt = cur.cow_child()
        if nxt is None or nxt.node is base:
            return st, depth
        length = st.length
        cur = nxt.node
        depth += 1
        if offset >= cur.length:
            return BlockStatus(Status.ZERO, length), depth
