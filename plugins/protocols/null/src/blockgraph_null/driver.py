"""A disk with no storage: writes vanish, reads return zeros (or leave the buffer alone)."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import attrs
from blockgraph.driver import BlockStatus, Concurrency, DriverKind, ReqFlags, Status
from blockgraph.errors import OptionError
from blockgraph.options import opt, parse_bool, parse_int, parse_size


@attrs.frozen(kw_only=True)
class NullOptions:
    size: int = opt(1 << 30, converter=parse_size, help="virtual size (default 1 GiB)")
    latency_ns: int = opt(0, key="latency-ns", converter=parse_int, validator=attrs.validators.ge(0),
                          help="delay every request by this many nanoseconds")
    read_zeroes: bool = opt(False, key="read-zeroes", converter=parse_bool,
                            help="fill read buffers with zeros instead of leaving them untouched")
    filename: str = opt("", help="only the bare protocol prefix is accepted")


class NullCoDriver:
    name: ClassVar[str] = "null-co"
    kind: ClassVar[DriverKind] = DriverKind.PROTOCOL
    api_version: ClassVar[int] = 1
    concurrency: ClassVar[Concurrency] = Concurrency.PARALLEL
    supported_write_flags: ClassVar[ReqFlags] = ReqFlags.FUA
    Options: ClassVar[type] = NullOptions

    @classmethod
    def parse_filename(cls, filename: str) -> dict[str, Any]:
        if filename != f"{cls.name}://":
            raise OptionError(f"The only allowed filename for this driver is '{cls.name}://'",
                              driver=cls.name, option="filename")
        return {}

    async def open(self, node: Any, options: NullOptions) -> None:
        self.node, self.options = node, options
        self.delay = options.latency_ns / 1e9

    async def close(self) -> None:
        """Nothing to release."""

    async def getlength(self) -> int:
        return self.options.size

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.options.read_zeroes:
            buf[:] = bytes(len(buf))

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)

    async def pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)

    async def flush(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)

    def allocated_size(self) -> int:
        """No storage at all (qemu-img info: "disk size: 0 B")."""
        return 0

    async def reopen_prepare(self, options: NullOptions, read_only: bool) -> None:
        """No state depends on the options being changed."""

    async def reopen_commit(self) -> None:
        """Nothing to switch."""

    async def reopen_abort(self) -> None:
        """Nothing was prepared."""

    async def block_status(self, offset: int, length: int, want_zero: bool) -> BlockStatus:
        # As QEMU's null: no data anywhere, and zeros only when reads return zeros.
        flags = Status.OFFSET_VALID | (Status.ZERO if self.options.read_zeroes else Status.NONE)
        return BlockStatus(flags, length, offset, self.node.graph_node)


class NullAioDriver(NullCoDriver):
    name: ClassVar[str] = "null-aio"
