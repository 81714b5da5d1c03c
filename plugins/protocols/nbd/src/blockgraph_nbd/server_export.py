"""One served export: a BlockBackend plus what the NBD server tells clients about it.

Transmission flags, block sizes, meta contexts and the block status they report
are computed here from the graph, so the handshake and the request loop stay
free of block-layer details.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import attrs
from blockgraph import bitmaps as core_bitmaps
from blockgraph import io
from blockgraph.backend import BlockBackend
from blockgraph.driver import Status
from blockgraph.errors import OptionError

from . import protocol as P

if TYPE_CHECKING:
    from blockgraph.node import Node
    from blockgraph.session import Session

TF = P.TransmissionFlag
ID_BASE_ALLOCATION = 0
ID_ALLOCATION_DEPTH = 1
ID_FIRST_BITMAP = 2
MAX_EXTENTS = 65536  # per BLOCK_STATUS chunk (proto.md allows 2^20; fewer keeps one reply small)
READ_LOOKAHEAD = 64 * 1024 * 1024  # how far read_map asks block status to look
YIELD_EVERY = 256  # block-status steps between two yields to the event loop


@attrs.define(eq=False)
class NbdExport:
    """What one export name serves. ``multi_conn`` is decided by the server's connection limit."""

    name: str
    blk: BlockBackend
    description: str = ""
    writable: bool = False
    allocation_depth: bool = False
    bitmaps: tuple[str, ...] = ()
    dirty: list[Any] = attrs.Factory(list)  # the DirtyBitmap behind each name of ``bitmaps``, busy while served
    multi_conn: bool = True
    id: str = ""
    node_name: str = ""
    shutting_down: bool = False
    clients: set[Any] = attrs.Factory(set)
    _data_span: tuple[int, int] = (0, 0)  # the last extent block status called data (read_map)

    type = "nbd"

    # ------------------------------------------------------------ what clients are told

    def size(self) -> int:
        return self.blk.getlength()

    def flags(self, structured: bool) -> int:
        """Transmission flags as qemu-nbd computes them; DF only once structured replies are on."""
        f = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_CACHE
        if self.writable:
            f |= TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO
        else:
            f |= TF.READ_ONLY
        if self.multi_conn:
            # Every connection shares this one BlockBackend: a flush on any of them covers all writes.
            f |= TF.CAN_MULTI_CONN
        if structured:
            f |= TF.SEND_DF
        return int(f)

    def block_sizes(self) -> tuple[int, int, int]:
        """(minimum, preferred, maximum payload) from the node's limits (qemu's nbd_negotiate_handle_info)."""
        lim = self.blk.node.limits
        minimum = max(lim.request_alignment, 1)
        preferred = max(minimum, 4096)
        maximum = max(min(lim.max_transfer or P.MAX_BUFFER, P.MAX_BUFFER), preferred)
        return minimum, preferred, maximum

    def contexts(self) -> list[tuple[int, str]]:
        """Every meta context this export offers, with the fixed ids qemu-nbd uses."""
        out = [(ID_BASE_ALLOCATION, P.CONTEXT_BASE_ALLOCATION)]
        if self.allocation_depth:
            out.append((ID_ALLOCATION_DEPTH, P.CONTEXT_ALLOCATION_DEPTH))
        out += [(ID_FIRST_BITMAP + i, P.CONTEXT_DIRTY_BITMAP_PREFIX + b) for i, b in enumerate(self.bitmaps)]
        return out

    def match_contexts(self, queries: list[str], listing: bool) -> list[tuple[int, str]]:
        """The contexts that ``queries`` select; namespace-only queries count for LIST only (as QEMU)."""
        available = self.contexts()
        if not queries:
            return available if listing else []
        chosen: set[int] = set()
        for q in queries:
            for cid, cname in available:
                if q == cname:
                    chosen.add(cid)
                elif listing and q in ("base:", "qemu:", P.CONTEXT_DIRTY_BITMAP_PREFIX):
                    if cname.startswith(q):
                        chosen.add(cid)
        return [(cid, cname) for cid, cname in available if cid in chosen]

    # ------------------------------------------------------------ block status

    async def extents(self, context_id: int, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
        """``[(length, flags)]`` covering ``[offset, offset+length)`` (just the first with REQ_ONE)."""
        if context_id == ID_BASE_ALLOCATION:
            status = self._allocation
        elif context_id == ID_ALLOCATION_DEPTH:
            status = self._depth
        elif 0 <= context_id - ID_FIRST_BITMAP < len(self.dirty):
            return _dirty_extents(self.dirty[context_id - ID_FIRST_BITMAP], offset, length, one)
        else:
            raise OptionError(f"meta context {context_id} is not offered")
        out: list[tuple[int, int]] = []
        end = offset + length
        steps = 0
        while offset < end:
            steps += 1
            if not steps % YIELD_EVERY:
                await asyncio.sleep(0)  # a fragmented image must not hold the loop for the other clients
            n, value = await status(offset, end - offset)
            if n <= 0:
                break
            if out and out[-1][1] == value:
                out[-1] = (out[-1][0] + n, value)
            elif len(out) >= MAX_EXTENTS:
                break
            else:
                out.append((n, value))
            offset += n
            if one:
                break
        return out

    async def _allocation(self, offset: int, length: int) -> tuple[int, int]:
        st, _depth = await io.block_status_above(self.blk.node, offset, length, None, True)
        flags = 0
        if not st.flags & Status.DATA:
            flags |= P.STATE_HOLE
        # Unallocated through the whole chain reads as zeros, whatever the bottom layer says.
        if st.flags & Status.ZERO or not st.flags & Status.ALLOCATED:
            flags |= P.STATE_ZERO
        return st.length, flags

    async def _depth(self, offset: int, length: int) -> tuple[int, int]:
        st, depth = await io.block_status_above(self.blk.node, offset, length, None, False)
        return st.length, depth + 1 if st.flags & Status.ALLOCATED else 0

    async def read_map(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``[(offset, length, zero)]`` for a sparse READ reply: zero runs become OFFSET_HOLE chunks.

        Block status is asked READ_LOOKAHEAD ahead and the last data extent remembered, so sequential
        reads of allocated data walk once per extent, not once per request. Only data is remembered:
        if it has become zero since, the reply carries the zeros as data, which is still right.
        """
        end = offset + length
        lo, hi = self._data_span
        if lo <= offset and end <= hi:
            return [(offset, length, False)]
        out: list[tuple[int, int, bool]] = []
        pos = offset
        steps = 0
        while pos < end:
            steps += 1
            if not steps % YIELD_EVERY:
                await asyncio.sleep(0)
            n, flags = await self._allocation(pos, max(end - pos, READ_LOOKAHEAD))
            if n <= 0:
                out.append((pos, end - pos, False))
                break
            zero = bool(flags & P.STATE_ZERO)
            if not zero:
                self._data_span = (pos, pos + n)
            n = min(n, end - pos)
            if out and out[-1][2] == zero:
                o, m, _ = out[-1]
                out[-1] = (o, m + n, zero)
            else:
                out.append((pos, n, zero))
            pos += n
        return out

    # ------------------------------------------------------------ life cycle

    async def close(self) -> None:
        for bm in self.dirty:
            bm.busy = False
        self.dirty = []
        await self.blk.close()

    def info(self) -> dict[str, Any]:
        """QMP's BlockExportInfo."""
        return {"id": self.id, "type": "nbd", "node-name": self.node_name, "shutting-down": self.shutting_down}


async def new_export(session: Session, node: Node, *, name: str, description: str = "", writable: bool = False,
                     writethrough: bool = False, allocation_depth: bool = False, bitmaps: tuple[str, ...] = (),
                     export_id: str = "") -> NbdExport:
    """Attach a BlockBackend to ``node`` (sharing everything, as QEMU's exports do) and describe it."""
    dirty = [_find_bitmap(node, b, writable) for b in bitmaps]
    if len(name.encode()) > P.MAX_STRING:
        raise OptionError(f"export name '{name}' too long")
    if len(description.encode()) > P.MAX_STRING:
        raise OptionError(f"export description '{description}' too long")
    blk = await BlockBackend.attach_new(session, node, read_only=not writable, share_all=True,
                                        write_cache=not writethrough)
    for bm in dirty:
        bm.busy = True  # nobody may clear or remove a bitmap a client is reading (as QEMU)
    return NbdExport(name=name, blk=blk, description=description, writable=writable,
                     allocation_depth=allocation_depth, bitmaps=tuple(bitmaps), dirty=dirty,
                     id=export_id or name, node_name=node.name)


def _find_bitmap(node: Node, name: str, writable: bool) -> Any:
    """The bitmap on ``node`` or the first node below it through filters and backing files (nbd_export_create)."""
    cur: Node | None = node
    while cur is not None:
        bm = core_bitmaps.find(cur, name)
        if bm is not None:
            break
        child = cur.filtered or cur.cow_child()
        cur = child.node if child is not None else None
    else:
        raise OptionError(f"Bitmap '{name}' is not found")
    try:
        bm.check(allow_ro=True)
    except core_bitmaps.BitmapError as e:
        raise OptionError(e.reason) from None
    if not writable and not cur.read_only and bm.enabled:  # it would change under the reader (bdrv_is_writable)
        raise OptionError(f"Enabled bitmap '{name}' incompatible with readonly export")
    return bm


def _dirty_extents(bm: Any, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
    """``[(length, NBD_STATE_DIRTY or 0)]`` from the bitmap; past its end nothing is dirty."""
    out: list[tuple[int, int]] = []
    for _start, n, dirty in bm.extents(offset, length):
        out.append((n, P.STATE_DIRTY if dirty else 0))
        if one or len(out) >= MAX_EXTENTS:
            return out
    covered = sum(n for n, _ in out)
    if covered < length:
        if out and out[-1][1] == 0:
            out[-1] = (out[-1][0] + length - covered, 0)
        else:
            out.append((length - covered, 0))
    return out
