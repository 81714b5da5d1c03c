"""Deliberately broken drivers: each is :class:`~blockgraph.testing.memdisk.MemDisk` with one bug.

The kit's own tests (``tests/test_conformance_kit.py``) run every contract check on the correct
``testing-memdisk`` (it must pass) and each check on the mutants listed for it in :data:`TARGETS`
(it must fail), so every check is known to be able to fail. Register them on a per-test host::

    PluginHost(autoload=False, extra=[(blockgraph.testing.mutants, "blockgraph-testing-mutants")])
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from .. import hookimpl
from ..driver import BlockStatus, Concurrency, DriverKind, PreallocMode, ReqFlags, Status
from ..errors import OptionError
from .memdisk import STORES, MemDisk, MemOptions, Passthrough, Store


class OffByOneRead(MemDisk):
    """Reads start one byte late."""

    name: ClassVar[str] = "mutant-off-by-one-read"

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        data = self.data[offset + 1:offset + 1 + len(buf)]
        buf[:] = data + bytes(len(buf) - len(data))


class WriteIgnoresOffset(MemDisk):
    """Every write lands at offset 0."""

    name: ClassVar[str] = "mutant-write-ignores-offset"

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        self.data[0:len(buf)] = buf


class SectorWrite(MemDisk):
    """Assumes 512-byte sectors without declaring request_alignment: writes land at the sector start."""

    name: ClassVar[str] = "mutant-sector-write"

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        start = offset - offset % 512
        self.data[start:start + len(buf)] = buf


class ZeroesNoop(MemDisk):
    """Claims ZeroWriter, does nothing."""

    name: ClassVar[str] = "mutant-zeroes-noop"

    async def pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        """Forgot to zero."""


class DiscardTooMuch(MemDisk):
    """Discard ignores the length and drops everything up to the end."""

    name: ClassVar[str] = "mutant-discard-too-much"

    async def pdiscard(self, offset: int, length: int) -> None:
        self.data[offset:] = bytes(len(self.data) - offset)


class DiscardNoop(MemDisk):
    """Declared (by its test) to read zeros after discard, but keeps the data."""

    name: ClassVar[str] = "mutant-discard-noop"

    async def pdiscard(self, offset: int, length: int) -> None:
        """Keeps everything."""


class StatusLiar(MemDisk):
    """Block status says everything is zero."""

    name: ClassVar[str] = "mutant-status-liar"

    async def block_status(self, offset: int, length: int, want_zero: bool) -> BlockStatus:
        return BlockStatus(Status.ZERO | Status.OFFSET_VALID, length, offset, self.node.graph_node)


class WriteBack(MemDisk):
    """Caches writes in a private copy; the medium is updated only on flush (and on close)."""

    name: ClassVar[str] = "mutant-flush-noop"
    flush_works: ClassVar[bool] = False

    async def open(self, node: Any, options: MemOptions) -> None:
        await super().open(node, options)
        self.medium = self.store
        self.store = Store(bytearray(self.medium.data))  # everything below reads and writes the cache

    async def flush(self) -> None:
        if self.flush_works:
            self.medium.data[:] = self.store.data

    async def close(self) -> None:
        if self.store is not None and not self.node.read_only:
            self.medium.data[:] = self.store.data
        self.store = None


class FuaIgnored(WriteBack):
    """Declares FUA support, flushes correctly, but a FUA write is only cached."""

    name: ClassVar[str] = "mutant-fua-ignored"
    flush_works: ClassVar[bool] = True


class TruncateIgnoresSize(MemDisk):
    """Truncate returns without resizing."""

    name: ClassVar[str] = "mutant-truncate-ignores-size"

    async def truncate(self, length: int, exact: bool, prealloc: PreallocMode) -> None:
        """Nothing changes."""


class TruncateKeepsData(MemDisk):
    """Shrinking only moves the end; growing again brings the old bytes back."""

    name: ClassVar[str] = "mutant-truncate-keeps-data"

    async def open(self, node: Any, options: MemOptions) -> None:
        await super().open(node, options)
        self.length = len(self.data)

    async def getlength(self) -> int:
        return self.length

    async def truncate(self, length: int, exact: bool, prealloc: PreallocMode) -> None:
        if length > len(self.data):
            self.data.extend(bytes(length - len(self.data)))
        self.length = length


class LengthLiar(MemDisk):
    """Reports 4 KiB more than it stores."""

    name: ClassVar[str] = "mutant-length-liar"

    async def getlength(self) -> int:
        return len(self.data) + 4096


class ReadOnlyWriteBack(WriteBack):
    """Caches the whole disk at open and writes it back on close, even when opened read-only."""

    name: ClassVar[str] = "mutant-read-only-writeback"
    flush_works: ClassVar[bool] = True

    async def close(self) -> None:
        if self.store is not None:
            self.medium.data[:] = self.store.data  # forgot: not when read-only
        self.store = None


class SeekThenWrite(MemDisk):
    """Keeps the position in the driver across an await (lseek + write on a shared fd), yet says PARALLEL."""

    name: ClassVar[str] = "mutant-seek-then-write"
    concurrency: ClassVar[Concurrency] = Concurrency.PARALLEL

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        self.pos = offset
        await asyncio.sleep(0)
        self.data[self.pos:self.pos + len(buf)] = buf


class Forgetful(MemDisk):
    """Ignores the store id: every open starts from a fresh, zeroed disk."""

    name: ClassVar[str] = "mutant-forgetful"

    @staticmethod
    def attach_store(options: MemOptions) -> Store:
        return Store(bytearray(options.size))


class ReopenForgets(MemDisk):
    """Reopening swaps in a fresh, zeroed disk (a driver that reopens the wrong file)."""

    name: ClassVar[str] = "mutant-reopen-forgets"

    async def reopen_commit(self) -> None:
        self.store = Store(bytearray(len(self.data)))


class DoubleCloseRaises(MemDisk):
    """A second close() fails instead of succeeding silently."""

    name: ClassVar[str] = "mutant-double-close-raises"

    async def close(self) -> None:
        del self.store  # AttributeError on the second call


class VagueOptionError(MemDisk):
    """Validates an option itself but does not say which node, driver or key was wrong."""

    name: ClassVar[str] = "mutant-vague-option-error"

    async def open(self, node: Any, options: MemOptions) -> None:
        bs = options.block_size
        if bs <= 0 or bs & (bs - 1):
            raise OptionError("must be a power of two")
        await super().open(node, options)


class KindLiar(MemDisk):
    """Registered as a format, but the class says protocol."""

    name: ClassVar[str] = "mutant-kind-liar"


class HalfWritable(MemDisk):
    """Has pwritev but no flush, so core silently treats it as read-only."""

    name: ClassVar[str] = "mutant-half-writable"
    flush = None  # type: ignore[assignment]


class XorFilter(Passthrough):
    """A 'filter' that changes the data (which only a format driver may do)."""

    name: ClassVar[str] = "mutant-xor-filter"

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        await self.file.preadv(offset, buf, flags)
        buf[:] = bytes(b ^ 0x20 for b in buf)


class DiscardDroppingFilter(Passthrough):
    """A filter that swallows discards instead of forwarding them."""

    name: ClassVar[str] = "mutant-discard-dropping-filter"

    async def pdiscard(self, offset: int, length: int) -> None:
        """Never reaches the child."""


# check name -> mutants that must fail it (with the harness declarations that expose the bug)
TARGETS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "read_back_aligned": [(OffByOneRead.name, {}), (WriteIgnoresOffset.name, {})],
    "read_back_unaligned": [(SectorWrite.name, {})],
    "write_zeroes": [(ZeroesNoop.name, {})],
    "discard": [(DiscardTooMuch.name, {"discard_reads_zero": False}), (DiscardNoop.name, {})],
    "block_status": [(StatusLiar.name, {})],
    "flush": [(WriteBack.name, {}), (FuaIgnored.name, {})],
    "truncate": [(TruncateIgnoresSize.name, {}), (TruncateKeepsData.name, {})],
    "out_of_range": [(LengthLiar.name, {})],
    "read_only": [(ReadOnlyWriteBack.name, {})],
    "concurrent": [(SeekThenWrite.name, {})],
    "reopen": [(Forgetful.name, {})],
    "live_reopen": [(ReopenForgets.name, {})],
    "close_idempotent": [(DoubleCloseRaises.name, {})],
    "option_errors": [(VagueOptionError.name, {})],
    "declared_capabilities": [(KindLiar.name, {}), (HalfWritable.name, {})],
}
FILTER_TARGETS: dict[str, list[str]] = {
    "read_back_aligned": [XorFilter.name],
    "filter_forwarding": [DiscardDroppingFilter.name],
}

_ALL = (OffByOneRead, WriteIgnoresOffset, SectorWrite, ZeroesNoop, DiscardTooMuch, DiscardNoop, StatusLiar,
        WriteBack, FuaIgnored, TruncateIgnoresSize, TruncateKeepsData, LengthLiar, ReadOnlyWriteBack,
        SeekThenWrite, Forgetful, ReopenForgets, DoubleCloseRaises, VagueOptionError, HalfWritable, XorFilter,
        DiscardDroppingFilter)


@hookimpl
def blockgraph_register_drivers(register: Any) -> None:
    for cls in _ALL:
        register(cls)
    register(KindLiar, kind=DriverKind.FORMAT)


__all__ = ["FILTER_TARGETS", "STORES", "TARGETS"]
