"""Small in-test drivers for the core's own tests, registered per test through ``PluginHost(extra=...)``.

``ram``   a protocol driver over a bytearray that records every call it receives (and can yield
          inside its data methods to force interleaving); variants without write-zeroes or discard.
``tcow``  a tiny copy-on-write format: identity mapping onto its ``file`` child, allocation kept in
          memory, an optional ``backing`` child, ``flush_to_os`` that records itself, a magic probe.

Every call is appended to ``driver.calls`` and, with the node name, to ``session.events`` so that
tests can check ordering across nodes.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import attrs
from blockgraph import hookimpl
from blockgraph.driver import BlockStatus, Concurrency, DriverKind, PreallocMode, ReqFlags, Status
from blockgraph.errors import BlockIOError, ImageLocked, NotSupported
from blockgraph.options import one_of, opt, parse_bool, parse_int, parse_size
from blockgraph.perms import ChildRole, Perm, perm_names


def _events(node: Any) -> list[tuple]:
    session = node.graph_node.session
    if not hasattr(session, "events"):
        session.events = []
    return session.events


@attrs.frozen(kw_only=True)
class RamOptions:
    size: int = opt(1 << 20, converter=parse_size)
    align: int = opt(1, converter=parse_int)
    max_transfer: int = opt(0, key="max-transfer", converter=parse_size)
    zero_align: int = opt(0, key="zero-align", converter=parse_int)
    max_zeroes: int = opt(0, key="max-zeroes", converter=parse_size)
    discard_align: int = opt(0, key="discard-align", converter=parse_int)
    yields: int = opt(0, converter=parse_int)  # await asyncio.sleep(0) this many times in data methods
    zeroes: str = opt("native", converter=one_of("native", "notsup"))
    fua: bool = opt(False, converter=parse_bool)
    serialize: bool = opt(False, converter=parse_bool)
    fill: int = opt(0, converter=parse_int)
    refuse: int = opt(0, converter=parse_int)  # ram-locky: Perm mask it will not take
    refuse_unshare: int = opt(0, key="refuse-unshare", converter=parse_int)  # ... nor let others miss


class RamDriver:
    """A RAM disk that records what the generic layer sends it."""

    name: ClassVar[str] = "ram"
    kind: ClassVar[DriverKind] = DriverKind.PROTOCOL
    api_version: ClassVar[int] = 1
    concurrency: ClassVar[Concurrency] = Concurrency.PARALLEL
    supported_write_flags: ClassVar[ReqFlags] = ReqFlags.NONE
    Options: ClassVar[type] = RamOptions

    async def open(self, node: Any, options: RamOptions) -> None:
        self.node, self.options = node, options
        self.data = bytearray([options.fill]) * options.size
        self.calls: list[tuple] = []
        self.fail: dict[str, int] = {}  # op -> errno, for error-policy tests
        self.in_flight = 0
        self.max_in_flight = 0
        node.set_limits(request_alignment=options.align, max_transfer=options.max_transfer,
                        pwrite_zeroes_alignment=options.zero_align, max_pwrite_zeroes=options.max_zeroes,
                        pdiscard_alignment=options.discard_align)
        if options.fua:
            self.supported_write_flags = ReqFlags.FUA

    def _record(self, *call: Any) -> None:
        self.calls.append(call)
        _events(self.node).append((self.node.node_name, *call))

    async def _yield(self) -> None:
        for _ in range(self.options.yields):
            await asyncio.sleep(0)

    async def _enter(self, op: str, offset: int, length: int) -> None:
        err = self.fail.get(op)
        if err:
            raise BlockIOError(err, node=self.node.node_name, op=op, offset=offset, length=length)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    async def close(self) -> None:
        self._record("close")

    async def getlength(self) -> int:
        return len(self.data)

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        self._record("read", offset, len(buf), flags)
        await self._enter("read", offset, len(buf))
        try:
            await self._yield()
            got = self.data[offset:offset + len(buf)]
            buf[:len(got)] = got
            buf[len(got):] = bytes(len(buf) - len(got))  # a last partial block past the end
            await self._yield()
        finally:
            self.in_flight -= 1

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        self._record("write", offset, len(buf), flags)
        await self._enter("write", offset, len(buf))
        try:
            await self._yield()
            self.data[offset:offset + len(buf)] = buf
            await self._yield()
        finally:
            self.in_flight -= 1

    async def flush(self) -> None:
        self._record("flush")
        await self._enter("flush", 0, 0)
        self.in_flight -= 1

    async def pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        self._record("zeroes", offset, length, flags)
        if self.options.zeroes == "notsup":
            raise NotSupported("ram: no efficient zeroing")
        await self._enter("zeroes", offset, length)
        try:
            await self._yield()
            self.data[offset:offset + length] = bytes(length)
        finally:
            self.in_flight -= 1

    async def pdiscard(self, offset: int, length: int) -> None:
        self._record("discard", offset, length)
        self.data[offset:offset + length] = bytes(length)

    async def truncate(self, length: int, exact: bool, prealloc: PreallocMode) -> None:
        self._record("truncate", length)
        if length < len(self.data):
            del self.data[length:]
        else:
            self.data.extend(bytes(length - len(self.data)))


class RamNoZeroDriver(RamDriver):
    """A RAM disk without ``pwrite_zeroes``, ``pdiscard`` or ``truncate``."""

    name: ClassVar[str] = "ram-nozero"
    pwrite_zeroes = None  # type: ignore[assignment]
    pdiscard = None  # type: ignore[assignment]
    truncate = None  # type: ignore[assignment]


class RamSerialDriver(RamDriver):
    """The same RAM disk, but with the default SERIALIZE_REQUESTS concurrency."""

    name: ClassVar[str] = "ram-serial"
    concurrency: ClassVar[Concurrency] = Concurrency.SERIALIZE_REQUESTS


class RamLockyDriver(RamDriver):
    """A RAM disk with permission hooks, like a file with locks, that can refuse some permissions."""

    name: ClassVar[str] = "ram-locky"

    async def open(self, node: Any, options: RamOptions) -> None:
        await super().open(node, options)
        self.perm_calls: list[tuple] = []

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        self.perm_calls.append(("check", perm, shared))
        _events(self.node).append((self.node.node_name, "check_perm", perm, shared))
        if perm & self.options.refuse:
            raise ImageLocked(f"{self.node.node_name}: refusing {perm_names(perm & self.options.refuse)}")
        if ~shared & self.options.refuse_unshare:
            raise ImageLocked(f"{self.node.node_name}: must share "
                              f"{perm_names(~shared & self.options.refuse_unshare)}")

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        self.perm_calls.append(("set", perm, shared))

    def abort_perm(self) -> None:
        self.perm_calls.append(("abort",))
        _events(self.node).append((self.node.node_name, "abort_perm"))


TCOW_MAGIC = b"TCOW\x00\x01"


@attrs.frozen(kw_only=True)
class TcowOptions:
    size: int | None = opt(None, converter=lambda v: None if v is None else parse_size(v))
    cluster: int = opt(4096, converter=parse_size)


class TcowDriver:
    """A copy-on-write format whose clusters sit at the same offset in its file (allocation in memory)."""

    name: ClassVar[str] = "tcow"
    kind: ClassVar[DriverKind] = DriverKind.FORMAT
    api_version: ClassVar[int] = 1
    concurrency: ClassVar[Concurrency] = Concurrency.PARALLEL
    child_options: ClassVar[tuple[str, ...]] = ("file", "backing")
    supported_write_flags: ClassVar[ReqFlags] = ReqFlags.NONE
    Options: ClassVar[type] = TcowOptions

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        return 100 if header.startswith(TCOW_MAGIC) else 0

    async def open(self, node: Any, options: TcowOptions) -> None:
        self.node = node
        self.cluster_size = options.cluster
        self.calls: list[tuple] = []
        self.allocated: set[int] = set()
        self.file = await node.open_child("file", ChildRole.IMAGE)
        self.backing = await node.open_child("backing", ChildRole.COW, required=False)
        self.size = options.size if options.size is not None else self.file.getlength()
        node.set_limits(request_alignment=self.cluster_size)

    def _record(self, *call: Any) -> None:
        self.calls.append(call)
        _events(self.node).append((self.node.node_name, *call))

    async def close(self) -> None:
        self._record("close")

    async def getlength(self) -> int:
        return self.size

    def mark(self, offset: int, length: int) -> None:
        """Pretend ``[offset, offset+length)`` was written in this layer (for chains built by hand)."""
        for c in range(offset // self.cluster_size, -(-(offset + length) // self.cluster_size)):
            self.allocated.add(c)

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        self._record("read", offset, len(buf))
        cs = self.cluster_size
        for pos in range(0, len(buf), cs):
            chunk = buf[pos:pos + cs]
            guest = offset + pos
            if guest // cs in self.allocated:
                await self.file.preadv(guest, chunk)
            elif self.backing is not None and guest < self.backing.getlength():
                n = min(len(chunk), self.backing.getlength() - guest)
                await self.backing.preadv(guest, chunk[:n])
                chunk[n:] = bytes(len(chunk) - n)
            else:
                chunk[:] = bytes(len(chunk))

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        self._record("write", offset, len(buf), flags)
        await self.file.pwritev(offset, buf)
        self.mark(offset, len(buf))

    async def flush_to_os(self) -> None:
        self._record("flush_to_os")

    async def flush(self) -> None:
        self._record("flush")

    async def block_status(self, offset: int, length: int, want_zero: bool) -> BlockStatus:
        cs = self.cluster_size
        first = offset // cs
        state = first in self.allocated
        end = offset + length
        pos = (first + 1) * cs
        while pos < end and ((pos // cs) in self.allocated) == state:
            pos += cs
        n = min(pos, end) - offset
        if state:
            return BlockStatus(Status.DATA | Status.OFFSET_VALID, n, offset, self.file.node)
        return BlockStatus(Status.NONE, n)


class DriversPlugin:
    """A plugin object registering the given driver classes (``PluginHost(extra=[(DriversPlugin(...), name)])``)."""

    def __init__(self, *classes: type) -> None:
        self.classes = classes

    @hookimpl
    def blockgraph_register_drivers(self, register: Any) -> None:
        for cls in self.classes:
            register(cls)


ALL_TEST_DRIVERS = (RamDriver, RamNoZeroDriver, RamSerialDriver, RamLockyDriver, TcowDriver)


def drivers_plugin() -> tuple[DriversPlugin, str]:
    """The ``extra`` entry for PluginHost that registers every test driver."""
    return DriversPlugin(*ALL_TEST_DRIVERS), "test-drivers"
