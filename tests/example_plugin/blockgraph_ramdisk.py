"""blockgraph-ramdisk: a disk in RAM, the complete example of docs/plugin-authors.md."""

from typing import ClassVar

import attrs
import blockgraph
from blockgraph.driver import DriverKind, ReqFlags
from blockgraph.node import NodeContext
from blockgraph.options import opt, parse_size


@attrs.frozen(kw_only=True)
class RamdiskOptions:
    size: int = opt(converter=parse_size, help="disk size, e.g. 64M")


class RamdiskDriver:
    name: ClassVar[str] = "ramdisk"
    kind: ClassVar[DriverKind] = DriverKind.PROTOCOL
    api_version: ClassVar[int] = 1
    Options: ClassVar[type] = RamdiskOptions

    async def open(self, node: NodeContext, options: RamdiskOptions) -> None:
        self._disk = bytearray(options.size)
        node.log.debug("ramdisk_opened", size=options.size)

    async def close(self) -> None:
        self._disk = bytearray()

    async def getlength(self) -> int:
        return len(self._disk)

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        buf[:] = memoryview(self._disk)[offset : offset + len(buf)]  # one copy, into the caller's buffer

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        self._disk[offset : offset + len(buf)] = buf

    async def flush(self) -> None:
        """RAM is the medium; nothing to persist."""


@blockgraph.hookimpl
def blockgraph_register_drivers(register):
    register(RamdiskDriver)
