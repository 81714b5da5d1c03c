"""The raw format: the file's bytes are the disk, optionally a window of them (offset/size)."""

from __future__ import annotations

import errno
from typing import Any, ClassVar

import attrs
from blockgraph.driver import BlockStatus, Concurrency, DriverKind, PreallocMode, ReqFlags, Status
from blockgraph.errors import BlockIOError, OpenError
from blockgraph.options import one_of, opt, optional, parse_bool, parse_size
from blockgraph.perms import ChildRole, Perm, default_child_perm

PROBE_SECTOR = 512


@attrs.frozen(kw_only=True)
class RawOptions:
    offset: int = opt(0, converter=parse_size, mutable=True, help="start of the disk inside the file")
    size: int | None = opt(None, converter=optional(parse_size), mutable=True,
                           help="length of the disk (default: up to the end of the file)")


@attrs.frozen(kw_only=True)
class RawCreateOptions:
    size: int = opt(converter=parse_size, help="virtual disk size")
    preallocation: str = opt("off", converter=one_of("off", "metadata", "falloc", "full"),
                             help="Preallocation mode (allowed values: off, falloc, full)")
    nocow: bool = opt(False, converter=parse_bool, help="Turn off copy-on-write (valid only on btrfs)")


class RawDriver:
    name: ClassVar[str] = "raw"
    kind: ClassVar[DriverKind] = DriverKind.FORMAT
    api_version: ClassVar[int] = 1
    concurrency: ClassVar[Concurrency] = Concurrency.PARALLEL
    child_options: ClassVar[tuple[str, ...]] = ("file",)
    supported_write_flags: ClassVar[ReqFlags] = ReqFlags.FUA
    supported_zero_flags: ClassVar[ReqFlags] = ReqFlags.FUA | ReqFlags.MAY_UNMAP | ReqFlags.NO_FALLBACK
    Options: ClassVar[type] = RawOptions
    CreateOptions: ClassVar[type] = RawCreateOptions

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        return 1  # anything is a raw image; every real format scores higher

    async def open(self, node: Any, options: RawOptions) -> None:
        self.node = node
        window = options.offset or options.size is not None
        role = (ChildRole.DATA | ChildRole.PRIMARY) if window else (ChildRole.FILTERED | ChildRole.PRIMARY)
        self.file = await node.open_child("file", role)
        self.offset, self.size = self._check_window(options)
        # A probed raw image must not have its first sector rewritten into another format's magic.
        align = PROBE_SECTOR if node.probed_raw else 1
        node.set_limits(request_alignment=align)

    def child_perm(self, name: str, role: ChildRole, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """QEMU's raw_child_perm: the default rules, but write and resize only when a parent asks for them."""
        want, share = default_child_perm(role, perm, shared, writable=not self.node.read_only)
        return (want & ~(Perm.WRITE | Perm.RESIZE)) | (perm & (Perm.WRITE | Perm.RESIZE)), share

    def _check_window(self, options: RawOptions) -> tuple[int, int | None]:
        file_len = self.file.getlength()
        if options.offset > file_len:
            raise OpenError(f"Offset ({options.offset}) cannot be greater than size of the containing file "
                            f"({file_len})")
        if options.size is not None and options.offset + options.size > file_len:
            # QEMU's text, double space included.
            raise OpenError(f"The sum of offset ({options.offset}) and size ({options.size}) has to be smaller "
                            f"or equal to the  actual size of the containing file ({file_len})")
        return options.offset, options.size

    async def close(self) -> None:
        """The child is detached by core."""

    async def getlength(self) -> int:
        if self.size is not None:
            return self.size
        return max(self.file.getlength() - self.offset, 0)

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        await self.file.preadv(offset + self.offset, buf, flags)

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        if offset == 0 and self.node.probed_raw:
            fmt = self.node.best_format(bytes(buf[:PROBE_SECTOR]))
            if fmt != self.name:
                raise BlockIOError(errno.EPERM, node=self.node.node_name, op="write", offset=0,
                                   length=len(buf), detail="Operation not permitted")
        await self.file.pwritev(offset + self.offset, buf, flags)

    async def pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        await self.file.pwrite_zeroes(offset + self.offset, length, flags)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self.file.pdiscard(offset + self.offset, length)

    async def flush(self) -> None:
        """Nothing cached here; core flushes the file child next."""

    async def block_status(self, offset: int, length: int, want_zero: bool) -> BlockStatus:
        return BlockStatus(Status.RECURSE | Status.OFFSET_VALID, length, offset + self.offset, self.file.node)

    async def truncate(self, length: int, exact: bool, prealloc: PreallocMode) -> None:
        if self.size is not None:
            raise BlockIOError(errno.ENOTSUP, node=self.node.node_name, op="truncate",
                               detail="Cannot resize fixed-size raw disks")
        await self.file.truncate(length + self.offset, exact, prealloc)

    async def reopen_prepare(self, options: RawOptions, read_only: bool) -> None:
        self._new_window = self._check_window(options)

    async def reopen_commit(self) -> None:
        self.offset, self.size = self._new_window

    async def reopen_abort(self) -> None:
        """Nothing was changed yet."""

    @classmethod
    async def create(cls, session: Any, filename: str, options: RawCreateOptions) -> None:
        proto = session.registry.protocol_for(filename) or "file"
        proto_cls = session.registry.driver(proto)
        # raw's create options are its protocol's (QEMU appends the protocol's create_opts).
        proto_fields = {f.name for f in attrs.fields(proto_cls.CreateOptions)}
        await proto_cls.create(session, filename, proto_cls.CreateOptions(
            **{k: v for k, v in attrs.asdict(options).items() if k in proto_fields}))

    @classmethod
    async def measure(cls, values: dict[str, str], size: int | None, source: Any) -> Any:
        """``img measure``: the source's length, or the size rounded up to sectors; unallocated space counts."""
        from blockgraph.driver import MeasureResult

        if source is not None:
            required = source.length
        else:
            required = -(-parse_size(values.get("size", "0")) // 512) * 512
        return MeasureResult(required, required)
