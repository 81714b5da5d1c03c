"""The conformance harness: how the driver under test is opened, and byte-level helpers for checks.

A :class:`Harness` says how to open the driver (name, option tree, size, plugin host) and what it
declares it guarantees. :meth:`Harness.open` opens it as users do: a new core
:class:`~blockgraph.session.Session`, ``open_node`` with the option tree, and a
:class:`~blockgraph.backend.BlockBackend` on top. No pytest here.
"""

from __future__ import annotations

import contextlib
import errno
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import attrs

from ..backend import BlockBackend
from ..driver import Capabilities
from ..errors import BlockGraphError, BlockIOError
from ..node import Node
from ..options import merge
from ..plugins import PluginHost
from ..session import Session

KIB = 1024
MIN_SIZE = 256 * KIB
NODE_NAME = "contract0"

# Capability field of driver.Capabilities -> the protocol an author implements.
PROTOCOLS = {"write": "Writable", "zero": "ZeroWriter", "discard": "Discarder",
             "block_status": "BlockStatusReporter", "truncate": "Truncatable", "reopen": "Reopenable"}


class ContractViolation(AssertionError):
    """The driver broke its contract; the message says which rule, where and how."""


class NotApplicable(Exception):
    """The check needs a capability the driver does not implement (or declares absent)."""


# ---------------------------------------------------------------- the harness


@attrs.frozen
class Opened:
    """One open of the driver under test: its session, node and the BlockBackend on top."""

    session: Session
    node: Node
    blk: BlockBackend


@attrs.define
class Harness:
    """How to open the driver under test, and what it declares it guarantees.

    ``options`` is the driver's option tree without ``driver`` (children included, e.g.
    ``{"file": {"driver": "file", "filename": ...}}``), for an image of ``size`` bytes.
    ``plugins`` builds the PluginHost of each session (default: installed plugins).
    """

    driver: str
    options: dict[str, Any]
    size: int = 1 << 20
    plugins: Callable[[], PluginHost] | None = None
    persistent: bool = False  # data survives close and open again
    stores_data: bool = True  # False: writes vanish and every read returns zeros (null-co)
    discard_reads_zero: bool = False  # True: discarded ranges read as zeros; False: zeros or old data
    supports_truncate: bool | None = None  # None: whatever the class implements
    concurrent_open: bool = True  # a read-only force-share open may run beside a writer
    invalid_options: dict[str, Any] = attrs.Factory(dict)  # key -> bad value, each must be an OptionError
    concurrent_requests: int = 64
    seed: int = 0
    child_store: str | None = None  # the testing-memdisk store under a filter (FilterContract)
    _host: PluginHost | None = attrs.field(default=None, init=False, repr=False)

    # ------------------------------------------------------------ plugins and capabilities

    def new_host(self) -> PluginHost:
        return self.plugins() if self.plugins is not None else PluginHost()

    @property
    def host(self) -> PluginHost:
        if self._host is None:
            self._host = self.new_host()
        return self._host

    @property
    def driver_class(self) -> type:
        return self.host.driver(self.driver)

    @property
    def caps(self) -> Capabilities:
        return Capabilities.of(self.driver_class)

    def require(self, cap: str) -> None:
        """Raise NotApplicable unless the driver implements ``cap`` (and does not declare it away)."""
        if not getattr(self.caps, cap):
            raise NotApplicable(f"{self.driver} does not implement {PROTOCOLS.get(cap, cap)}")
        if cap == "truncate" and self.supports_truncate is False:
            raise NotApplicable(f"{self.driver} declares supports_truncate = False")

    # ------------------------------------------------------------ opening

    def tree(self, **extra: Any) -> dict[str, Any]:
        return merge({"driver": self.driver, "node-name": NODE_NAME, **self.options}, extra)

    @contextlib.asynccontextmanager
    async def open(self, *, read_only: bool = False, force_share: bool = False,
                   extra: dict[str, Any] | None = None) -> AsyncIterator[Opened]:
        """Open the driver in a new session with a BlockBackend; everything is closed on exit."""
        if not read_only and not self.caps.write:
            read_only = True  # a driver without Writable is always opened read-only
        session = Session(plugins=self.new_host())
        try:
            more: dict[str, Any] = dict(extra or {})
            if read_only:
                more["read-only"] = True
            if force_share:
                more["force-share"] = True
            if not read_only:
                more.setdefault("discard", "unmap")  # let discards reach the driver
            try:
                node = await session.open_node(self.tree(**more))
                blk = await BlockBackend.attach_new(session, node, read_only=read_only, share_all=force_share)
            except BlockGraphError as e:
                raise ContractViolation(f"opening {self.driver} ({'read-only' if read_only else 'read-write'}) "
                                        f"failed: {type(e).__name__}: {e}") from e
            yield Opened(session, node, blk)
        finally:
            await session.close()

    @contextlib.asynccontextmanager
    async def open_writable(self) -> AsyncIterator[Opened]:
        self.require("write")
        async with self.open() as o:
            yield o


# ---------------------------------------------------------------- helpers


def pattern(tag: int, n: int) -> bytes:
    """``n`` deterministic bytes, none of them zero (so "reads zeros" and "reads data" never agree)."""
    return random.Random(tag).randbytes(n).replace(b"\0", b"\x5a")


async def read(blk: BlockBackend, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    await call(f"read at offset {offset}, {n} bytes", blk.preadv(offset, memoryview(buf)))
    return bytes(buf)


async def call(what: str, aw: Awaitable[Any]) -> Any:
    """Await ``aw``; any failure becomes a ContractViolation that says what was being done."""
    try:
        return await aw
    except (ContractViolation, NotApplicable):
        raise
    except Exception as e:
        raise ContractViolation(f"{what} failed: {type(e).__name__}: {e}") from e


async def expect_error(what: str, aw: Awaitable[Any], errnos: Sequence[int]) -> BlockIOError:
    """``aw`` must fail with a BlockIOError carrying one of ``errnos``."""
    names = "/".join(errno.errorcode[e] for e in errnos)
    try:
        await aw
    except BlockIOError as e:
        if e.errno not in errnos:
            raise ContractViolation(f"{what}: expected {names}, got {errno.errorcode.get(e.errno, e.errno)}: "
                                    f"{e}") from e
        return e
    except Exception as e:
        raise ContractViolation(f"{what}: expected BlockIOError({names}), got {type(e).__name__}: {e}") from e
    raise ContractViolation(f"{what}: expected BlockIOError({names}), but it succeeded")


def assert_bytes(actual: bytes, expected: bytes, base: int, what: str) -> None:
    if actual == expected:
        return
    if len(actual) != len(expected):
        raise ContractViolation(f"{what}: got {len(actual)} bytes, expected {len(expected)}")
    first = next(i for i in range(len(actual)) if actual[i] != expected[i])
    bad = sum(1 for a, b in zip(actual, expected, strict=True) if a != b)
    raise ContractViolation(
        f"{what}: {bad} byte(s) differ, first at offset {base + first}: "
        f"got {actual[first:first + 8].hex()}, expected {expected[first:first + 8].hex()}")


def assert_allowed(actual: bytes, candidates: Sequence[bytes], base: int, what: str) -> None:
    """Each byte of ``actual`` must equal the byte at the same place in one of ``candidates``."""
    step = 4096
    for pos in range(0, len(actual), step):
        chunk = actual[pos:pos + step]
        if any(chunk == c[pos:pos + step] for c in candidates):
            continue
        for i, byte in enumerate(chunk, pos):
            if all(c[i] != byte for c in candidates):
                raise ContractViolation(f"{what}: byte at offset {base + i} is {byte:#04x}, which no "
                                        f"allowed outcome has ({', '.join(f'{c[i]:#04x}' for c in candidates)})")


class Model:
    """The serial model of the disk: what each byte must read as."""

    def __init__(self, data: bytes, stores_data: bool) -> None:
        self.data = bytearray(data)
        self.stores = stores_data

    def write(self, offset: int, data: bytes) -> None:
        if self.stores:
            self.data[offset:offset + len(data)] = data

    def zero(self, offset: int, n: int) -> None:
        self.data[offset:offset + n] = bytes(n)

    def resize(self, n: int) -> None:
        del self.data[n:]
        self.data.extend(bytes(n - len(self.data)))

    def __getitem__(self, s: slice) -> bytes:
        return bytes(self.data[s])


async def model_of(h: Harness, blk: BlockBackend) -> Model:
    data = await read(blk, 0, blk.getlength())
    if not h.stores_data:
        assert_bytes(data, bytes(len(data)), 0, f"{h.driver} declares stores_data = False, so reads must be zeros")
    return Model(data, h.stores_data)


async def verify_all(h: Harness, blk: BlockBackend, model: Model, what: str) -> None:
    assert_bytes(await read(blk, 0, blk.getlength()), bytes(model.data), 0, what)


def clip(plan: Sequence[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    return [(o, n) for o, n in plan if 0 <= o and n > 0 and o + n <= length]


def check_size(h: Harness, length: int) -> None:
    if length != h.size:
        raise ContractViolation(f"getlength() is {length}, but the image was made with size {h.size}")
    if length < MIN_SIZE:
        raise ContractViolation(f"the conformance kit needs an image of at least {MIN_SIZE} bytes, got {length}")


async def fill(h: Harness, blk: BlockBackend, model: Model | None, ranges: Sequence[tuple[int, int]],
               tag: int) -> None:
    """Write distinct patterns to ``ranges`` (those inside the disk), keeping ``model`` in step."""
    for i, (off, n) in enumerate(clip(ranges, blk.getlength())):
        data = pattern(h.seed + tag + i, n)
        await call(f"write at offset {off}, {n} bytes", blk.pwritev(off, memoryview(data)))
        if model is not None:
            model.write(off, data)
