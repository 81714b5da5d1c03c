"""The ``file`` and ``host_device`` protocol drivers (QEMU's file-posix)."""

from __future__ import annotations

import errno
import mmap
import os
import stat
from typing import Any, ClassVar

import attrs
from blockgraph.driver import BlockStatus, Concurrency, DriverKind, PreallocMode, ReqFlags, Status
from blockgraph.errors import BlockIOError, NotSupported, OpenError, OptionError
from blockgraph.options import one_of, opt, parse_bool, parse_size, parse_str
from blockgraph.perms import Perm

from . import fallocate as fa
from . import locking

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
MAX_TRANSFER = 1 << 30
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


@attrs.frozen(kw_only=True)
class FileOptions:
    filename: str = opt(converter=parse_str, help="path of the image file or block device")
    aio: str = opt("threads", converter=one_of("threads", "native", "io_uring"),
                   help="I/O engine; this driver implements threads")
    aio_max_batch: int = opt(0, key="aio-max-batch", converter=parse_size)
    locking: str = opt("auto", converter=one_of("auto", "on", "off"),
                       help="byte-range locks compatible with QEMU's")
    drop_cache: bool = opt(True, key="drop-cache", converter=parse_bool)


@attrs.frozen(kw_only=True)
class FileCreateOptions:
    size: int = opt(converter=parse_size, help="virtual disk size")
    preallocation: str = opt("off", converter=one_of("off", "metadata", "falloc", "full"),
                             help="Preallocation mode (allowed values: off, falloc, full)")
    nocow: bool = opt(False, converter=parse_bool)


def _aligned(size: int) -> memoryview:
    """Page-aligned memory for O_DIRECT bounce buffers."""
    return memoryview(mmap.mmap(-1, max(size, 1)))[:size]


class FileDriver:
    """Regular image files, with QEMU-compatible locking."""

    name: ClassVar[str] = "file"
    kind: ClassVar[DriverKind] = DriverKind.PROTOCOL
    api_version: ClassVar[int] = 1
    concurrency: ClassVar[Concurrency] = Concurrency.PARALLEL
    protocols: ClassVar[tuple[str, ...]] = ("file",)
    supported_write_flags: ClassVar[ReqFlags] = ReqFlags.NONE
    Options: ClassVar[type] = FileOptions
    CreateOptions: ClassVar[type] = FileCreateOptions
    block_device: ClassVar[bool] = False

    fd: int = -1

    @classmethod
    def parse_filename(cls, filename: str) -> dict[str, Any]:
        prefix = f"{cls.name}:"
        return {"filename": filename[len(prefix):] if filename.startswith(prefix) else filename}

    async def open(self, node: Any, options: FileOptions) -> None:
        self.node, self.options = node, options
        self.filename = options.filename
        if options.aio != "threads":
            if options.aio == "native" and not node.cache_direct:
                raise OptionError("aio=native was specified, but it requires cache.direct=on",
                                  node=node.node_name, driver=self.name, option="aio")
            raise OptionError(f"aio={options.aio} is not available (no installed plugin provides it)",
                              node=node.node_name, driver=self.name, option="aio")
        flags = (os.O_RDONLY if node.read_only else os.O_RDWR) | os.O_CLOEXEC
        if node.cache_direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(self.filename, flags)
        except OSError as e:
            raise OpenError(f"Could not open '{self.filename}': {e.strerror}") from None
        except ValueError:  # a NUL byte (a corrupt image's backing name): no such file
            raise OpenError(f"Could not open '{self.filename}': {os.strerror(errno.ENOENT)}") from None
        st = os.fstat(self.fd)
        self.is_blk = stat.S_ISBLK(st.st_mode)
        if self.block_device and not self.is_blk:
            os.close(self.fd)
            raise OpenError(f"'{self.filename}' is not a block device")
        if stat.S_ISDIR(st.st_mode):
            os.close(self.fd)
            raise OpenError(f"Could not open '{self.filename}': Is a directory")
        try:
            self._setup(node, options)
        except BaseException:
            fd, self.fd = self.fd, -1
            os.close(fd)  # a failed open keeps nothing (core does not call close() then)
            raise

    def _setup(self, node: Any, options: FileOptions) -> None:
        self.use_lock = options.locking == "on" or (options.locking == "auto" and locking.supported(self.fd))
        if options.locking == "on" and not locking.supported(self.fd):
            raise OpenError(f"'{self.filename}': locking=on but the file system does not support OFD locks")
        self.nowait_read = bool(_NOWAIT) and not node.cache_direct
        self.nowait_write = self.nowait_read
        self.can_zero_range = self.can_punch = not self.is_blk
        self.seek_data = not self.is_blk
        self.perm, self.shared = Perm.NONE, Perm.ALL
        self._pending: tuple[int, int] | None = None
        align = self._probe_alignment() if node.cache_direct else 1
        node.set_limits(request_alignment=align, max_transfer=MAX_TRANSFER,
                        min_mem_alignment=mmap.PAGESIZE if node.cache_direct else 1,
                        pdiscard_alignment=self._probe_alignment() if self.is_blk else 0)  # BLKDISCARD: sectors
        self.direct = node.cache_direct

    def _probe_alignment(self) -> int:
        if self.is_blk:
            import array
            import fcntl

            buf = array.array("i", [0])
            try:
                fcntl.ioctl(self.fd, BLKSSZGET, buf)
                if buf[0] > 0:
                    return buf[0]
            except OSError:
                pass
        probe = _aligned(4096)
        for align in (1, 512, 1024, 2048, 4096):
            try:
                os.preadv(self.fd, [probe[:align]], 0)
                return max(align, 512) if align == 1 else align
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        raise OpenError(f"'{self.filename}': Could not find working O_DIRECT alignment")

    async def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)  # closing the descriptor drops every OFD lock it held

    async def getlength(self) -> int:
        if self.is_blk:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    # ------------------------------------------------------------ data path

    def _read(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        done = 0
        while done < n:
            got = os.preadv(self.fd, [buf[done:]], offset + done)
            if got == 0:
                buf[done:] = bytes(n - done)  # past EOF reads as zeros
                return
            done += got

    def _direct(self, fn: Any, offset: int, buf: memoryview, write: bool) -> None:
        try:
            fn(offset, buf)
        except OSError as e:
            if e.errno != errno.EINVAL or not self.direct:
                raise
            bounce = _aligned(len(buf))  # the caller's memory is not aligned for O_DIRECT
            if write:
                bounce[:] = buf
                fn(offset, bounce)
            else:
                fn(offset, bounce)
                buf[:] = bounce

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        if self.nowait_read:
            try:
                got = os.preadv(self.fd, [buf], offset, _NOWAIT)
                if got == len(buf):
                    return
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise BlockIOError(e.errno, node=self.node.node_name, op="read", offset=offset,
                                       length=len(buf)) from None
                self.nowait_read = False
        try:
            await self.node.run_blocking(self._direct, self._read, offset, buf, False)
        except OSError as e:
            raise BlockIOError(e.errno, node=self.node.node_name, op="read", offset=offset,
                               length=len(buf)) from None

    def _write(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        done = 0
        while done < n:
            done += os.pwritev(self.fd, [buf[done:]], offset + done)

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        if self.nowait_write:
            try:
                got = os.pwritev(self.fd, [buf], offset, _NOWAIT)
                if got == len(buf):
                    return
                offset, buf = offset + got, buf[got:]
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise BlockIOError(e.errno, node=self.node.node_name, op="write", offset=offset,
                                       length=len(buf)) from None
                self.nowait_write = False
        try:
            await self.node.run_blocking(self._direct, self._write, offset, buf, True)
        except OSError as e:
            raise BlockIOError(e.errno, node=self.node.node_name, op="write", offset=offset,
                               length=len(buf)) from None

    async def flush(self) -> None:
        try:
            await self.node.run_blocking(os.fdatasync, self.fd)
        except OSError as e:
            raise BlockIOError(e.errno, node=self.node.node_name, op="flush") from None

    async def pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        try:
            await self.node.run_blocking(self._zeroes, offset, length, bool(flags & ReqFlags.MAY_UNMAP))
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise NotSupported(str(e)) from None
            raise BlockIOError(e.errno, node=self.node.node_name, op="write zeroes", offset=offset,
                               length=length) from None

    def _zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if self.is_blk:
            import fcntl
            import struct

            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        size = os.fstat(self.fd).st_size
        if offset >= size:
            os.posix_fallocate(self.fd, offset, length)
            return
        if unmap and self.can_punch:
            fa.punch_hole(self.fd, offset, length)
            if offset + length > size:
                os.posix_fallocate(self.fd, size, offset + length - size)
            return
        if self.can_zero_range:
            try:
                fa.zero_range(self.fd, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.can_zero_range = False
        if self.can_punch:
            fa.punch_hole(self.fd, offset, length)
            os.posix_fallocate(self.fd, offset, length)
            return
        raise OSError(errno.EOPNOTSUPP, "no efficient zeroing")

    async def pdiscard(self, offset: int, length: int) -> None:
        try:
            if self.is_blk:
                import fcntl
                import struct

                await self.node.run_blocking(fcntl.ioctl, self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
            else:
                await self.node.run_blocking(fa.punch_hole, self.fd, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                raise NotSupported(str(e)) from None
            raise BlockIOError(e.errno, node=self.node.node_name, op="discard", offset=offset,
                               length=length) from None

    async def block_status(self, offset: int, length: int, want_zero: bool) -> BlockStatus:
        data = Status.DATA | Status.OFFSET_VALID
        if not self.seek_data or not want_zero:
            return BlockStatus(data, length, offset, self.node_ref)
        try:
            start = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # in the trailing hole
                return BlockStatus(Status.ZERO | Status.OFFSET_VALID, length, offset, self.node_ref)
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                self.seek_data = False
                return BlockStatus(data, length, offset, self.node_ref)
            raise
        if start > offset:
            return BlockStatus(Status.ZERO | Status.OFFSET_VALID, min(start - offset, length), offset, self.node_ref)
        hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return BlockStatus(data, max(min(hole - offset, length), 1), offset, self.node_ref)

    @property
    def node_ref(self) -> Any:
        return self.node.graph_node  # the Node, so parents can tell which file holds the data

    async def truncate(self, length: int, exact: bool, prealloc: PreallocMode) -> None:
        try:
            await self.node.run_blocking(self._truncate, length, exact, prealloc)
        except OSError as e:
            raise BlockIOError(e.errno, node=self.node.node_name, op="truncate", detail=e.strerror) from None

    def _truncate(self, length: int, exact: bool, prealloc: PreallocMode) -> None:
        old = os.fstat(self.fd).st_size
        if self.is_blk:
            if length > os.lseek(self.fd, 0, os.SEEK_END):
                raise OSError(errno.EINVAL, "Cannot grow device files")
            return
        check_prealloc(prealloc)
        if prealloc is not PreallocMode.OFF and length < old:
            raise OSError(errno.ENOTSUP, "Cannot use preallocation for shrinking files")
        os.ftruncate(self.fd, length)
        grow(self.fd, old, length, prealloc)

    # ------------------------------------------------------------ permissions -> locks

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        if not self.use_lock or self.fd < 0:
            return
        old = self._pending or (self.perm, self.shared)
        union = (perm | old[0], shared & old[1])
        if union == old:
            return  # only giving things up: nothing to test (raw_handle_perm_lock, RAW_PL_PREPARE)
        # Lock the union first so nobody slips in between check and set (raw_check_perm).
        try:
            locking.apply(self.fd, union[0], union[1], old[0], old[1])
            self._pending = union
            locking.check(self.fd, perm, shared, self.filename)
        except BaseException:
            # A refused check cleans up after itself: the caller aborts only what it checked.
            locking.apply(self.fd, self.perm, self.shared, *union)  # only unlocks: safe after a partial apply
            self._pending = None
            raise

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        if self.use_lock and self.fd >= 0:
            cur = self._pending or (self.perm, self.shared)
            locking.apply(self.fd, perm, shared, *cur)
        self._pending = None
        self.perm, self.shared = perm, shared

    def abort_perm(self) -> None:
        if self.use_lock and self.fd >= 0 and self._pending:
            locking.apply(self.fd, self.perm, self.shared, *self._pending)
        self._pending = None

    # ------------------------------------------------------------ reopen

    async def reopen_prepare(self, options: FileOptions, read_only: bool) -> None:
        """Open the new descriptor now; the old one keeps the locks until commit."""
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | (os.O_DIRECT if self.direct else 0)
        try:
            self._reopen_fd = os.open(self.filename, flags)
        except OSError as e:
            raise OpenError(f"Could not reopen '{self.filename}': {e.strerror}") from None

    async def reopen_commit(self) -> None:
        new, self._reopen_fd = self._reopen_fd, -1
        if self.use_lock:
            # Permission checks ran on the old descriptor; the new one takes the same bytes before
            # the old one (and its locks) goes away, so the image is never unlocked in between.
            locking.apply(new, self.perm, self.shared, Perm.NONE, Perm.ALL)
        old, self.fd = self.fd, new
        os.close(old)

    async def reopen_abort(self) -> None:
        fd, self._reopen_fd = getattr(self, "_reopen_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    # ------------------------------------------------------------ create

    @classmethod
    async def create(cls, session: Any, filename: str, options: FileCreateOptions) -> None:
        path = cls.parse_filename(filename)["filename"]
        try:
            prealloc = check_prealloc(PreallocMode(options.preallocation))
        except OSError as e:
            raise OpenError(e.strerror) from None
        size = -(-options.size // 512) * 512  # whole sectors, as QEMU creates them

        def work() -> None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise OpenError(f"Could not create '{path}': {e.strerror}") from None
            try:
                # Lock before truncating, so an image in use elsewhere is refused, not wiped
                # (raw_co_create: write and resize held, resize not shared).
                if locking.supported(fd):
                    perm, shared = Perm.WRITE | Perm.RESIZE, Perm.ALL & ~Perm.RESIZE
                    locking.apply(fd, perm, shared, Perm.NONE, Perm.ALL)
                    locking.check(fd, perm, shared, path)
                os.ftruncate(fd, 0)
                if options.nocow:
                    set_nocow(fd)
                grow(fd, 0, size, prealloc, truncate=True)
            finally:
                os.close(fd)  # drops the locks

        await session.run_blocking(work)

    def allocated_size(self) -> int:
        """Bytes the file occupies on the host (qemu-img's "disk size")."""
        return os.fstat(self.fd).st_blocks * 512

    def info(self) -> dict[str, Any]:
        return {}


def check_prealloc(prealloc: PreallocMode) -> PreallocMode:
    """Refuse modes this driver cannot do before anything is changed."""
    if prealloc not in (PreallocMode.OFF, PreallocMode.FALLOC, PreallocMode.FULL):
        raise OSError(errno.ENOTSUP, f"Unsupported preallocation mode: {prealloc.value}")
    return prealloc


def set_nocow(fd: int) -> None:
    """Best effort, as QEMU: set FS_NOCOW_FL (btrfs); file systems without it ignore the request."""
    import array
    import fcntl

    fs_ioc_getflags, fs_ioc_setflags, fs_nocow_fl = 0x80086601, 0x40086602, 0x00800000
    flags = array.array("l", [0])
    try:
        fcntl.ioctl(fd, fs_ioc_getflags, flags)
        flags[0] |= fs_nocow_fl
        fcntl.ioctl(fd, fs_ioc_setflags, flags)
    except OSError:
        pass


def grow(fd: int, old: int, length: int, prealloc: PreallocMode, truncate: bool = False) -> None:
    """Extend a file to ``length`` with the preallocation QEMU's file driver offers."""
    check_prealloc(prealloc)
    if truncate:
        os.ftruncate(fd, length)
    if length <= old:
        return
    if prealloc is PreallocMode.OFF:
        if old == 0:
            # Write the first block, so that O_DIRECT alignment probing works on a new image.
            os.pwrite(fd, bytes(min(length, max(4096, mmap.PAGESIZE))), 0)
    elif prealloc is PreallocMode.FALLOC:
        os.posix_fallocate(fd, old, length - old)
    else:
        chunk = bytes(1 << 20)
        for pos in range(old, length, len(chunk)):
            os.pwrite(fd, chunk[:min(len(chunk), length - pos)], pos)
        os.fsync(fd)


class HostDeviceDriver(FileDriver):
    """Host block devices (/dev/sdX, /dev/loopN)."""

    name: ClassVar[str] = "host_device"
    protocols: ClassVar[tuple[str, ...]] = ("host_device",)
    block_device: ClassVar[bool] = True
