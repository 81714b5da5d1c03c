"""In-memory dirty bitmaps (QEMU's BdrvDirtyBitmap).

A bitmap holds one bit per ``granularity`` bytes of its node, in a bytearray (bit ``i`` is bit ``i % 8``
of byte ``i // 8``, the order qcow2 stores on disk), so memory is bounded by length / granularity / 8.
The generic I/O layer calls :func:`set_dirty` when a write, write-zeroes or discard completes on a node
(where QEMU calls bdrv_set_dirty); every enabled bitmap of the node records it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .errors import BlockGraphError

if TYPE_CHECKING:
    from .node import Node

MAX_NAME_SIZE = 1023  # BDRV_BITMAP_MAX_NAME_SIZE
_NONZERO = re.compile(rb"[^\x00]")
_NONFF = re.compile(rb"[^\xff]")


class BitmapError(BlockGraphError):
    """A bitmap operation refused, with QEMU's text."""

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(reason)
        self.reason, self.hint = reason, hint

    def __str__(self) -> str:
        return self.reason


def default_granularity(node: Node) -> int:
    """The cluster size clamped to [4 KiB, 64 KiB], or 64 KiB (bdrv_get_default_bitmap_granularity)."""
    cluster = int(getattr(node.driver, "cluster_size", 0) or 0)
    return min(max(cluster, 4096), 65536) if cluster > 0 else 65536


class DirtyBitmap:
    """One bitmap over ``size`` bytes; ``enabled`` bitmaps record writes."""

    __slots__ = ("bits", "busy", "enabled", "granularity", "inconsistent", "name", "persistent", "readonly",
                 "shift", "size")

    def __init__(self, name: str | None, granularity: int, size: int, *, enabled: bool = True,
                 persistent: bool = False) -> None:
        if granularity < 1 or granularity & (granularity - 1):
            raise ValueError("granularity must be a power of two")
        self.name, self.granularity, self.size = name, granularity, size
        self.shift = granularity.bit_length() - 1
        self.bits = bytearray((self.granules + 7) // 8)
        self.enabled, self.persistent = enabled, persistent
        self.busy = self.readonly = self.inconsistent = False

    def __repr__(self) -> str:
        return f"<DirtyBitmap {self.name!r} granularity={self.granularity} count={self.count()}>"

    @property
    def granules(self) -> int:
        return -(-self.size >> self.shift) if self.size else 0

    def resize(self, size: int) -> None:
        """Follow the node's length; granules beyond the new end are dropped (bdrv_dirty_bitmap_truncate)."""
        old = self.granules
        self.size = size
        n = self.granules
        if n < old:
            self._assign(n, old, False)
        need = (n + 7) // 8
        if need < len(self.bits):
            del self.bits[need:]
        else:
            self.bits.extend(bytes(need - len(self.bits)))

    # ------------------------------------------------------------ bits

    def _assign(self, g0: int, g1: int, value: bool) -> None:
        """Set (or clear) granules [g0, g1)."""
        bits = self.bits
        while g0 < g1 and g0 & 7:
            bits[g0 >> 3] = bits[g0 >> 3] | (1 << (g0 & 7)) if value else bits[g0 >> 3] & ~(1 << (g0 & 7))
            g0 += 1
        full_end = g1 & ~7
        if full_end > g0:
            bits[g0 >> 3:full_end >> 3] = (b"\xff" if value else b"\x00") * ((full_end - g0) >> 3)
            g0 = full_end
        while g0 < g1:
            bits[g0 >> 3] = bits[g0 >> 3] | (1 << (g0 & 7)) if value else bits[g0 >> 3] & ~(1 << (g0 & 7))
            g0 += 1

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        end = min(offset + length, self.size)
        if offset >= end:
            return 0, 0
        return offset >> self.shift, -(-end >> self.shift)

    def set(self, offset: int, length: int) -> None:
        """Mark every granule touching [offset, offset + length) dirty."""
        g0, g1 = self._span(offset, length)
        self._assign(g0, g1, True)

    def reset(self, offset: int, length: int) -> None:
        """Clear granules inside [offset, offset + length) (an end inside the last granule counts at EOF)."""
        g0, g1 = self._span(offset, length)
        self._assign(g0, g1, False)

    def clear(self) -> None:
        self.bits[:] = bytes(len(self.bits))

    def get(self, offset: int) -> bool:
        g = offset >> self.shift
        return g < self.granules and bool(self.bits[g >> 3] >> (g & 7) & 1)

    def count(self) -> int:
        """Dirty bytes, whole granules (QEMU's ``count``)."""
        return int.from_bytes(self.bits, "little").bit_count() << self.shift

    def _next(self, g: int, dirty: bool) -> int:
        """The first granule at or after ``g`` that is dirty (or clean); ``granules`` when there is none."""
        n = self.granules
        bits = self.bits
        while g < n and g & 7:
            if bool(bits[g >> 3] >> (g & 7) & 1) == dirty:
                return g
            g += 1
        if g >= n:
            return n
        m = (_NONZERO if dirty else _NONFF).search(bits, g >> 3)
        if m is None:
            return n
        g = m.start() << 3
        while g < n and bool(bits[g >> 3] >> (g & 7) & 1) != dirty:
            g += 1
        return min(g, n)

    def extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(start, length, dirty) runs covering [offset, offset + length) clipped to the bitmap's size."""
        end = min(offset + length, self.size)
        pos = offset
        while pos < end:
            g = pos >> self.shift
            dirty = self.get(pos)
            nxt = self._next(g + 1, not dirty) << self.shift
            stop = min(nxt, end)
            yield pos, stop - pos, dirty
            pos = stop

    def merge(self, other: DirtyBitmap) -> None:
        """OR ``other`` in; granularities may differ (each dirty run of ``other`` is set here)."""
        if other.granularity == self.granularity and len(other.bits) == len(self.bits):
            merged = int.from_bytes(self.bits, "little") | int.from_bytes(other.bits, "little")
            self.bits[:] = merged.to_bytes(len(self.bits), "little")
            return
        for start, length, dirty in other.extents(0, other.size):
            if dirty:
                self._assign(*self._span(start, length), True)

    # ------------------------------------------------------------ QEMU's checks

    def check(self, *, allow_ro: bool = False) -> None:
        """bdrv_dirty_bitmap_check: busy, read-only and inconsistent bitmaps are refused."""
        if self.busy:
            raise BitmapError(f"Bitmap '{self.name}' is currently in use by another operation and cannot be used")
        if self.readonly and not allow_ro:
            raise BitmapError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if self.inconsistent:
            raise BitmapError(f"Bitmap '{self.name}' is inconsistent and cannot be used",
                              "Try block-dirty-bitmap-remove to delete this bitmap from disk")

    def info(self) -> dict[str, object]:
        """BlockDirtyInfo in the order qemu-storage-daemon prints it."""
        out: dict[str, object] = {}
        if self.name is not None:
            out["name"] = self.name
        out.update({"recording": self.enabled,
                    "persistent": self.persistent, "busy": self.busy, "granularity": self.granularity,
                    "count": self.count()})
        if self.inconsistent:
            out["inconsistent"] = True
        return out


# ---------------------------------------------------------------- per node


def set_dirty(node: Node, offset: int, length: int) -> None:
    """Called by the I/O layer after a write, write-zeroes or discard on ``node`` (bdrv_set_dirty)."""
    for bm in node.dirty_bitmaps:
        if bm.enabled and not bm.readonly:
            if bm.size != node.length:  # the node grew (a write past the end) or was truncated
                bm.resize(node.length)
            bm.set(offset, length)


def find(node: Node, name: str) -> DirtyBitmap | None:
    for bm in node.dirty_bitmaps:
        if bm.name == name:
            return bm
    return None


def create(node: Node, name: str | None, granularity: int | None = None, *, enabled: bool = True,
           persistent: bool = False) -> DirtyBitmap:
    """bdrv_create_dirty_bitmap: a new bitmap, listed first as QEMU lists them."""
    if name is not None:
        if find(node, name) is not None:
            raise BitmapError(f"Bitmap already exists: {name}")
        if len(name) > MAX_NAME_SIZE:
            raise BitmapError(f"Bitmap name too long: {name}")
    bm = DirtyBitmap(name, granularity or default_granularity(node), node.length, enabled=enabled,
                     persistent=persistent)
    node.dirty_bitmaps.insert(0, bm)
    return bm


def remove(node: Node, bm: DirtyBitmap) -> None:
    node.dirty_bitmaps.remove(bm)
