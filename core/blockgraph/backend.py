"""BlockBackend: the root through which devices, exports, jobs, tools and scripts do I/O."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import io
from .driver import BlockStatus, PreallocMode, ReqFlags
from .errors import BlockIOError, OptionError
from .node import Child, Node, attach, detach, set_edge_perm
from .perms import ChildRole, Perm

if TYPE_CHECKING:
    from .session import Session

ERROR_ACTIONS = ("report", "ignore", "enospc", "stop")


class BlockBackend:
    """A named (or anonymous) user of one root node.

    ``rerror``/``werror`` decide what a failed request does: ``report`` raises,
    ``ignore`` pretends success, ``enospc`` stops on ENOSPC and reports the rest,
    ``stop`` sets the iostatus and holds the request until :meth:`resume`.
    """

    def __init__(self, session: Session, name: str | None = None, *, read_only: bool = False,
                 share_all: bool = False, write_cache: bool = True, rerror: str = "report",
                 werror: str = "enospc", copy_on_read: bool = False, resize: bool = False) -> None:
        for opt_name, value in (("rerror", rerror), ("werror", werror)):
            if value not in ERROR_ACTIONS or (opt_name == "rerror" and value == "enospc"):
                raise OptionError(f"'{value}' invalid {'read' if opt_name == 'rerror' else 'write'} error action",
                                  option=opt_name)
        self.session, self.name = session, name
        self.read_only = read_only
        self.write_cache = write_cache
        self.rerror, self.werror = rerror, werror
        self.copy_on_read = copy_on_read
        self.iostatus = "ok"
        self.root: Child | None = None
        self.perm = Perm.CONSISTENT_READ | (Perm.NONE if read_only else Perm.WRITE) | (Perm.RESIZE if resize else 0)
        self.shared = Perm.ALL if share_all else Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
        self.on_error: list[Callable[[BlockBackend, str, str, BlockIOError], None]] = []
        self._resume: asyncio.Event | None = None
        self._quiesce = 0
        self._unquiesced: asyncio.Event | None = None
        self.stats = {"rd_bytes": 0, "wr_bytes": 0, "rd_operations": 0, "wr_operations": 0,
                      "flush_operations": 0, "unmap_operations": 0, "failed_rd_operations": 0,
                      "failed_wr_operations": 0}

    def describe(self) -> str:
        return f"block device '{self.name}'" if self.name else "an unnamed block device"

    @classmethod
    async def attach_new(cls, session: Session, node: Node, **kw: Any) -> BlockBackend:
        blk = cls(session, **kw)
        blk.insert(node)
        return blk

    # ------------------------------------------------------------ graph

    def insert(self, node: Node) -> None:
        if self.name and self.session.backends.get(self.name, self) is not self:
            raise OptionError(f"Device with id '{self.name}' already exists")
        if self.name and self.name in self.session.nodes:
            raise OptionError(f"Device name '{self.name}' conflicts with an existing node name")
        if not self.read_only and node.read_only:
            raise BlockIOError(errno.EACCES, node=node.name, op="open", detail="Block node is read-only")
        self.root = attach(self, node, "root", ChildRole.IMAGE, perm=self.perm, shared=self.shared)
        if self.name:
            self.session.backends[self.name] = self

    @property
    def node(self) -> Node:
        if self.root is None:
            raise BlockIOError(errno.ENOMEDIUM, op="I/O", detail="No medium inserted")
        return self.root.node

    async def close(self) -> None:
        if self.root is not None:
            await self.drain()
            root, self.root = self.root, None
            await detach(root)
        if self.name and self.session.backends.get(self.name) is self:
            del self.session.backends[self.name]

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        set_edge_perm(self.root, perm, shared)
        self.perm, self.shared = perm, shared

    # ------------------------------------------------------------ drain

    async def drain(self) -> None:
        """Wait until nothing is in flight on the node, holding every user's new requests meanwhile."""
        async with io.drained(self.node):
            pass

    def quiesce(self) -> None:
        """Hold new requests until :meth:`unquiesce` (called by drained sections on the graph)."""
        self._quiesce += 1

    def unquiesce(self) -> None:
        self._quiesce -= 1
        if not self._quiesce and self._unquiesced is not None:
            self._unquiesced.set()
            self._unquiesced = None

    async def _wait_quiesced(self) -> None:
        while self._quiesce:
            if self._unquiesced is None:
                self._unquiesced = asyncio.Event()
            await self._unquiesced.wait()

    # ------------------------------------------------------------ errors

    def _action(self, is_read: bool, err: BlockIOError) -> str:
        policy = self.rerror if is_read else self.werror
        if policy == "enospc":
            return "stop" if err.errno == errno.ENOSPC else "report"
        return policy

    async def _handle(self, is_read: bool, err: BlockIOError) -> bool:
        """Apply the error policy; True means retry the request."""
        action = self._action(is_read, err)
        for cb in self.on_error:
            cb(self, "read" if is_read else "write", action, err)
        if action == "ignore":
            return False
        if action == "report":
            raise err
        self.iostatus = "nospace" if err.errno == errno.ENOSPC else "failed"
        if self._resume is None:
            self._resume = asyncio.Event()
        await self._resume.wait()
        return True

    def resume(self) -> None:
        """Retry requests held by a ``stop`` action and reset the iostatus (QMP ``cont``)."""
        self.iostatus = "ok"
        if self._resume is not None:
            self._resume.set()
            self._resume = None

    def _check(self, offset: int, length: int, write: bool, op: str) -> Node:
        node = self.node
        if offset < 0 or length < 0 or offset + length > node.length:
            raise BlockIOError(errno.EIO, node=node.name, op=op, offset=offset, length=length)
        if write and (self.read_only or not self.root.perm & Perm.WRITE):
            raise BlockIOError(errno.EPERM, node=node.name, op=op, offset=offset, length=length,
                               detail="Block node is read-only")
        return node

    # ------------------------------------------------------------ I/O

    def getlength(self) -> int:
        return self.node.length

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags = ReqFlags.NONE) -> None:
        if self._quiesce:
            await self._wait_quiesced()
        node = self._check(offset, len(buf), False, "read")
        if self.copy_on_read:
            flags |= ReqFlags.COPY_ON_READ
        while True:
            try:
                await io.preadv(node, offset, buf, flags)
                break
            except BlockIOError as e:
                self.stats["failed_rd_operations"] += 1
                if not await self._handle(True, e):
                    break
        self.stats["rd_bytes"] += len(buf)
        self.stats["rd_operations"] += 1

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags = ReqFlags.NONE) -> None:
        if self._quiesce:
            await self._wait_quiesced()
        node = self._check(offset, len(buf), True, "write")
        if not self.write_cache:
            flags |= ReqFlags.FUA
        await self._write(io.pwritev(node, offset, buf, flags), lambda: io.pwritev(node, offset, buf, flags))
        self.stats["wr_bytes"] += len(buf)
        self.stats["wr_operations"] += 1

    async def pwrite_compressed(self, offset: int, buf: memoryview) -> None:
        """Store ``buf`` compressed (qemu-io's ``write -c``, blk_pwrite_compressed); the format checks alignment."""
        node = self._check(offset, len(buf), True, "write")
        if not getattr(node.driver, "supported_write_flags", ReqFlags.NONE) & ReqFlags.WRITE_COMPRESSED:
            raise BlockIOError(errno.ENOTSUP, node=node.name, op="write", offset=offset, length=len(buf))
        await self.pwritev(offset, buf, ReqFlags.WRITE_COMPRESSED)

    async def pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags = ReqFlags.NONE) -> None:
        if self._quiesce:
            await self._wait_quiesced()
        node = self._check(offset, length, True, "write")
        if not self.write_cache:
            flags |= ReqFlags.FUA
        await self._write(io.pwrite_zeroes(node, offset, length, flags),
                          lambda: io.pwrite_zeroes(node, offset, length, flags))
        self.stats["wr_operations"] += 1

    async def pdiscard(self, offset: int, length: int) -> None:
        if self._quiesce:
            await self._wait_quiesced()
        node = self._check(offset, length, True, "discard")
        await io.pdiscard(node, offset, length)
        self.stats["unmap_operations"] += 1

    async def _write(self, first: Any, again: Callable[[], Any]) -> None:
        coro = first
        while True:
            try:
                await coro
                return
            except BlockIOError as e:
                self.stats["failed_wr_operations"] += 1
                if not await self._handle(False, e):
                    return
                coro = again()

    async def flush(self) -> None:
        self.stats["flush_operations"] += 1
        await io.flush(self.node)

    async def truncate(self, length: int, *, exact: bool = True, prealloc: PreallocMode = PreallocMode.OFF) -> None:
        """Resize; takes the resize permission for the duration (qemu-io's truncate does the same)."""
        node = self.node
        if self.read_only:
            raise BlockIOError(errno.EPERM, node=node.name, op="truncate", detail="Block node is read-only")
        had = self.root.perm
        if not had & Perm.RESIZE:
            self.set_perm(had | Perm.RESIZE, self.shared)
        try:
            async with io.drained(node):
                await io.truncate(node, length, exact, prealloc)
        finally:
            if not had & Perm.RESIZE:
                self.set_perm(had, self.shared)

    async def block_status(self, offset: int, length: int, *, base: Node | None = None,
                           want_zero: bool = True) -> tuple[BlockStatus, int]:
        """Status through the backing chain, with the depth of the layer that answers."""
        return await io.block_status_above(self.node, offset, length, base, want_zero)
