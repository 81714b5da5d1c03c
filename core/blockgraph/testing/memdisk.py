"""Reference drivers for testing: a correct in-memory disk and a correct pass-through filter.

``testing-memdisk`` keeps its bytes in a module-level store named by the ``id`` option, so a
second open with the same id sees the same data (a persistent driver without files), and it
records every call that reaches it (``STORES[id].log``) so filter tests can see what was
forwarded. It yields to the loop inside each request, so concurrent requests interleave.
``testing-passthrough`` is a ``kind=FILTER`` driver that forwards everything unchanged.

Neither is registered by default; tests register them on a per-test host::

    PluginHost(extra=[(blockgraph.testing.memdisk, "blockgraph-testing-memdisk")])
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import attrs

from .. import hookimpl
from ..driver import BlockStatus, Concurrency, DriverKind, PreallocMode, ReqFlags, Status
from ..errors import OptionError
from ..options import opt, parse_int, parse_size, parse_str
from ..perms import ChildRole

ZERO_GRANULE = 4096


@attrs.define(eq=False)
class Store:
    """The medium behind one ``id``: the bytes and the calls that reached them."""

    data: bytearray
    log: list[tuple[str, int, int]] = attrs.Factory(list)

    def __repr__(self) -> str:
        return f"<Store {len(self.data)} bytes, {len(self.log)} calls>"


STORES: dict[str, Store] = {}


def store(store_id: str) -> Store:
    return STORES[store_id]


@attrs.frozen(kw_only=True)
class MemOptions:
    size: int = opt(converter=parse_size, help="size of a new store (an existing id keeps its own)")
    id: str = opt("", converter=parse_str, help="store name; opening the same id again sees the same data")
    block_size: int = opt(1, key="block-size", converter=parse_int, help="request alignment, a power of two")
    max_transfer: int = opt(0, key="max-transfer", converter=parse_size, help="largest request (0: no limit)")
    discard_granularity: int = opt(0, key="discard-granularity", converter=parse_size,
                                   help="discard alignment (0: none)")


class ReopensInPlace:
    """Reopen for drivers whose state does not depend on the read-only flag or the options."""

    async def reopen_prepare(self, options: Any, read_only: bool) -> None:
        """Nothing to prepare: no handle to reopen."""

    async def reopen_commit(self) -> None:
        """Nothing was prepared."""

    async def reopen_abort(self) -> None:
        """Nothing was prepared."""


class MemDisk(ReopensInPlace):
    """A correct protocol driver over a bytearray."""

    name: ClassVar[str] = "testing-memdisk"
    kind: ClassVar[DriverKind] = DriverKind.PROTOCOL
    api_version: ClassVar[int] = 1
    concurrency: ClassVar[Concurrency] = Concurrency.PARALLEL
    supported_write_flags: ClassVar[ReqFlags] = ReqFlags.FUA
    supported_zero_flags: ClassVar[ReqFlags] = ReqFlags.FUA | ReqFlags.MAY_UNMAP
    Options: ClassVar[type] = MemOptions

    store: Store | None = None

    async def open(self, node: Any, options: MemOptions) -> None:
        bs = options.block_size
        if bs <= 0 or bs & (bs - 1):
            raise OptionError(f"must be a power of two, got {bs}", node=node.node_name, driver=self.name,
                              option="block-size")
        self.node, self.options = node, options
        self.store = self.attach_store(options)
        node.set_limits(request_alignment=bs, max_transfer=options.max_transfer,
                        pdiscard_alignment=options.discard_granularity)

    @staticmethod
    def attach_store(options: MemOptions) -> Store:
        if options.id and options.id in STORES:
            return STORES[options.id]
        st = Store(bytearray(options.size))
        if options.id:
            STORES[options.id] = st
        return st

    async def close(self) -> None:
        self.store = None

    @property
    def data(self) -> bytearray:
        return self.store.data

    def record(self, verb: str, offset: int, length: int) -> None:
        self.store.log.append((verb, offset, length))

    async def getlength(self) -> int:
        return len(self.data)

    def check(self, offset: int, length: int, align: int, transfer: bool = True) -> None:
        """What core promises (driver.py); a broken promise is a core bug, so say it loudly."""
        lim = self.node.graph_node.limits
        if offset % align or length % align or offset < 0 or offset + length > len(self.data):
            raise AssertionError(f"core sent a request at {offset}+{length} (alignment {align}, "
                                 f"length {len(self.data)})")
        if transfer and lim.max_transfer and length > lim.max_transfer:
            raise AssertionError(f"core sent {length} bytes, more than max_transfer {lim.max_transfer}")

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        self.check(offset, len(buf), self.options.block_size)
        await asyncio.sleep(0)
        self.record("read", offset, len(buf))
        buf[:] = self.data[offset:offset + len(buf)]

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        self.check(offset, len(buf), self.options.block_size)
        await asyncio.sleep(0)
        self.record("write", offset, len(buf))
        self.data[offset:offset + len(buf)] = buf

    async def pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        self.check(offset, length, self.options.block_size, transfer=False)
        await asyncio.sleep(0)
        self.record("zero", offset, length)
        self.data[offset:offset + length] = bytes(length)

    async def pdiscard(self, offset: int, length: int) -> None:
        self.check(offset, length, max(self.options.discard_granularity, self.options.block_size), transfer=False)
        await asyncio.sleep(0)
        self.record("discard", offset, length)
        self.data[offset:offset + length] = bytes(length)

    async def flush(self) -> None:
        self.record("flush", 0, 0)

    async def block_status(self, offset: int, length: int, want_zero: bool) -> BlockStatus:
        """ZERO or DATA, decided per 4 KiB granule (a partial granule counts as a whole)."""
        end = min(offset + length, len(self.data))

        def zero_at(pos: int) -> bool:
            stop = min(pos - pos % ZERO_GRANULE + ZERO_GRANULE, len(self.data))
            return self.data.count(0, pos, stop) == stop - pos

        first = zero_at(offset)
        pos = offset - offset % ZERO_GRANULE + ZERO_GRANULE
        while pos < end and zero_at(pos) == first:
            pos += ZERO_GRANULE
        flags = (Status.ZERO if first else Status.DATA) | Status.OFFSET_VALID
        return BlockStatus(flags, min(pos, end) - offset, offset, self.node.graph_node)

    async def truncate(self, length: int, exact: bool, prealloc: PreallocMode) -> None:
        self.record("truncate", length, 0)
        del self.data[length:]
        self.data.extend(bytes(length - len(self.data)))


@attrs.frozen(kw_only=True)
class NoOptions:
    """A driver without options of its own."""


class Passthrough(ReopensInPlace):
    """A correct filter: one filtered child, every request forwarded unchanged."""

    name: ClassVar[str] = "testing-passthrough"
    kind: ClassVar[DriverKind] = DriverKind.FILTER
    api_version: ClassVar[int] = 1
    concurrency: ClassVar[Concurrency] = Concurrency.PARALLEL
    child_options: ClassVar[tuple[str, ...]] = ("file",)
    supported_write_flags: ClassVar[ReqFlags] = ReqFlags.FUA
    supported_zero_flags: ClassVar[ReqFlags] = ReqFlags.FUA | ReqFlags.MAY_UNMAP | ReqFlags.NO_FALLBACK
    Options: ClassVar[type] = NoOptions

    async def open(self, node: Any, options: NoOptions) -> None:
        self.file = await node.open_child("file", ChildRole.FILTERED | ChildRole.PRIMARY)

    async def close(self) -> None:
        """The child is detached by core."""

    async def getlength(self) -> int:
        return self.file.getlength()

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        await self.file.preadv(offset, buf, flags)

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        await self.file.pwritev(offset, buf, flags)

    async def pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        await self.file.pwrite_zeroes(offset, length, flags)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self.file.pdiscard(offset, length)

    async def flush(self) -> None:
        """Nothing cached here; core flushes the child next."""

    async def truncate(self, length: int, exact: bool, prealloc: PreallocMode) -> None:
        await self.file.truncate(length, exact, prealloc)


@hookimpl
def blockgraph_register_drivers(register: Any) -> None:
    register(MemDisk)
    register(Passthrough)
