"""Extents: the pieces a VMDK disk is made of (flat windows of a file, zero ranges, sparse extents)."""

from __future__ import annotations

import errno
from typing import Any

from blockgraph.errors import BlockIOError

FLAT, ZERO, SPARSE = "flat", "zero", "sparse"

# What a range of an extent holds.
UNALLOC, ZEROED, DATA, COMPRESSED = "unalloc", "zeroed", "data", "compressed"


class Extent:
    """Common fields: where the extent sits in the virtual disk and how it may be accessed."""

    kind = FLAT

    def __init__(self, *, start: int, length: int, access: str, type_name: str, child: Any, node_name: str) -> None:
        self.start, self.length, self.access, self.type_name = start, length, access, type_name
        self.child, self.node_name = child, node_name

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def filename(self) -> str:
        return self.child.node.filename if self.child is not None else ""

    def refuse(self, op: str, offset: int, length: int) -> None:
        """NOACCESS extents refuse everything, RDONLY ones refuse writes."""
        if self.access == "NOACCESS" or (op != "read" and self.access != "RW"):
            raise BlockIOError(errno.EACCES, node=self.node_name, op=op, offset=offset, length=length,
                               detail=f"extent {self.access} '{self.filename or self.type_name}' does not allow "
                                      f"{'access' if self.access == 'NOACCESS' else 'writes'}")

    def io_error(self, err: int, op: str, offset: int, length: int, detail: str) -> BlockIOError:
        return BlockIOError(err, node=self.node_name, op=op, offset=offset, length=length, detail=detail)


class FlatExtent(Extent):
    """A window of a raw file starting at ``base`` bytes (FLAT and VMFS extents)."""

    kind = FLAT

    def __init__(self, *, base: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.base = base

    async def read(self, rel: int, buf: memoryview) -> None:
        host = self.base + rel
        avail = max(0, min(len(buf), self.child.getlength() - host))
        if avail:
            await self.child.preadv(host, buf[:avail])
        if avail < len(buf):
            buf[avail:] = bytes(len(buf) - avail)  # a flat file shorter than its extent reads as zeros

    async def write(self, rel: int, buf: memoryview, flags: Any) -> None:
        host = self.base + rel
        if host + len(buf) > self.child.getlength():
            await self.child.truncate(host + len(buf))
        await self.child.pwritev(host, buf, flags)

    async def write_zeroes(self, rel: int, length: int, flags: Any, dry_run: bool) -> bool:
        if not dry_run:
            host = self.base + rel
            if host + length > self.child.getlength():
                await self.child.truncate(host + length)
            await self.child.pwrite_zeroes(host, length, flags)
        return True


class ZeroExtent(Extent):
    """A ZERO extent: no file, reads zeros, cannot hold data."""

    kind = ZERO

    async def read(self, rel: int, buf: memoryview) -> None:
        buf[:] = bytes(len(buf))

    async def write(self, rel: int, buf: memoryview, flags: Any) -> None:
        raise self.io_error(errno.EACCES, "write", self.start + rel, len(buf), "a ZERO extent cannot hold data")

    async def write_zeroes(self, rel: int, length: int, flags: Any, dry_run: bool) -> bool:
        return True
