"""The qcow2 format driver: open, read, block status, info, flush (writes in :mod:`.write`)."""

from __future__ import annotations

import asyncio
import errno
import struct
import time
from typing import Any, ClassVar

from blockgraph.driver import BlockStatus, Concurrency, DriverKind, ReqFlags, Status
from blockgraph.errors import BlockIOError, ImageCorrupt, OpenError, OptionError
from blockgraph.perms import ChildRole

from . import compress
from .amend import AmendMixin
from .bitmaps import can_store_new as can_store_new_bitmap
from .bitmaps import info as bitmaps_info
from .bitmaps import load as load_bitmaps
from .bitmaps import store as store_bitmaps
from .check import CheckMixin
from .constants import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPRESSION_NAMES,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    MAGIC,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    ClusterType,
)
from .header import Header
from .image import Image
from .measure import MeasureMixin
from .options import CREATE_SHOWN_DEFAULTS, Qcow2CreateOptions, Qcow2Options, cache_entries, cache_sizes
from .resize import ResizeMixin
from .snapshot import SnapshotMixin
from .vmstate import VmstateMixin
from .write import FullDiscardMixin, WriteMixin

_UNALLOC = (ClusterType.UNALLOCATED, ClusterType.UNALLOCATED_ALLOC)
_ZERO = (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC)


class Qcow2Driver(WriteMixin, FullDiscardMixin, ResizeMixin, CheckMixin, SnapshotMixin, VmstateMixin, AmendMixin,
                  MeasureMixin):
    name: ClassVar[str] = "qcow2"
    kind: ClassVar[DriverKind] = DriverKind.FORMAT
    api_version: ClassVar[int] = 1
    concurrency: ClassVar[Concurrency] = Concurrency.PARALLEL
    child_options: ClassVar[tuple[str, ...]] = ("file", "data-file", "backing")
    supports_backing: ClassVar[bool] = True
    supported_write_flags: ClassVar[ReqFlags] = ReqFlags.WRITE_COMPRESSED
    supported_zero_flags: ClassVar[ReqFlags] = ReqFlags.MAY_UNMAP | ReqFlags.NO_FALLBACK
    Options: ClassVar[type] = Qcow2Options
    CreateOptions: ClassVar[type] = Qcow2CreateOptions
    create_shown_defaults: ClassVar[dict[str, str]] = CREATE_SHOWN_DEFAULTS
    can_store_new_dirty_bitmap = can_store_new_bitmap  # block-dirty-bitmap-add persistent=true (bitmaps.py)

    img: Image
    cluster_size: int

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        from .probe import probe

        return probe(header, filename)

    # ------------------------------------------------------------ open / close

    async def open(self, node: Any, options: Qcow2Options) -> None:
        self.node = node
        self.options = options
        self.file = await node.open_child("file", ChildRole.IMAGE)
        self.backing = None
        h = await self._read_header()
        self.read_only = node.read_only
        if h.incompatible_features & INCOMPAT_CORRUPT and not self.read_only:
            raise OpenError("qcow2: Image is corrupt; cannot be opened read/write")
        lazy = h.lazy_refcounts if options.lazy_refcounts is None else options.lazy_refcounts
        if lazy and h.version < 3:
            raise OptionError("Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")
        try:
            l2_bytes, slice_size, rc_bytes = cache_sizes(options, h.cluster_size, h.size, h.l2_entry_size)
        except OptionError as e:
            raise OptionError(e.reason, option=e.option) from None  # QEMU prints the reason alone
        l2_n, rc_n = cache_entries(l2_bytes, slice_size, rc_bytes, h.cluster_size)
        self.img = img = Image(self.file, h, node_name=node.node_name, l2_cache_entries=l2_n,
                               l2_slice_size=slice_size, refcount_cache_clusters=rc_n)
        img.lazy = lazy
        self.cluster_size = h.cluster_size
        await img.load(self.file.getlength())
        if getattr(node, "check_mode", False):  # as QEMU with BDRV_O_CHECK: the check reads (and repairs) the table
            self.snapshots, self.snapshots_size = [], 0
        else:
            await self.load_snapshots()
        await self._open_data_file(h)
        if h.backing_file and not node.backing_disabled():
            if h.data_file_raw:
                raise OpenError("data-file-raw cannot be combined with a backing file")
            self.backing = await node.open_backing(h.backing_file, h.backing_format)
        elif node.has_child_spec("backing"):
            self.backing = await node.open_backing(None, None)
        self.discard_request = (options.pass_discard_request if options.pass_discard_request is not None
                                else bool(getattr(node.graph_node, "discard_unmap", False)))
        self._decompressed: tuple[int, bytes] | None = None
        self._init_write_state()
        if h.dirty and not self.read_only:
            await self._repair_dirty()
        keep = h.autoclear_features & (AUTOCLEAR_DATA_FILE_RAW | await load_bitmaps(self, h))
        if not self.read_only and h.autoclear_features != keep:
            # Unknown autoclear bits are dropped (bitmaps.load keeps its bit when it maintains the bitmaps).
            h.autoclear_features = keep
            await img.write_header()
            await self.file.flush()
        # Zero writes come unsplit: pwrite_zeroes handles unaligned edges itself (it widens them to whole
        # subclusters that already read zeros, as QEMU's qcow2_co_pwrite_zeroes).
        node.set_limits(request_alignment=1, pdiscard_alignment=h.cluster_size)
        self._clean_task = None
        if options.cache_clean_interval > 0:
            self._clean_task = asyncio.get_running_loop().create_task(self._clean_loop(options.cache_clean_interval))

    async def _read_header(self) -> Header:
        flen = self.file.getlength()
        head = bytearray(min(flen, 4096))
        if head:
            await self.file.preadv(0, memoryview(head))
        if len(head) < 72 or head[:4] != MAGIC:
            raise OpenError("Image is not in qcow2 format")
        cbits = struct.unpack_from(">I", head, 20)[0]
        if MIN_CLUSTER_BITS <= cbits <= MAX_CLUSTER_BITS and (1 << cbits) > len(head) and flen > len(head):
            head = bytearray(min(flen, 1 << cbits))
            await self.file.preadv(0, memoryview(head))
        return Header.parse(bytes(head))

    async def _open_data_file(self, h: Header) -> None:
        img = self.img
        if h.incompatible_features & INCOMPAT_DATA_FILE:
            default = None
            if h.data_file and not self.node.has_child_spec("data-file"):
                # As QEMU: the name is opened as given (relative to the working directory, not the image).
                registry = self.node.graph_node.session.registry
                default = {"driver": registry.protocol_for(h.data_file) or "file", "filename": h.data_file}
            if default is None and not self.node.has_child_spec("data-file"):
                raise OpenError("'data-file' is required for this image")
            img.data = await self.node.open_child("data-file", ChildRole.DATA, default=default)
            img.has_data_file = True
        elif self.node.has_child_spec("data-file"):
            raise OpenError("'data-file' can only be set for images with an external data file")
        self.data = img.data

    async def _repair_dirty(self) -> None:
        try:
            from .check import repair_on_open  # type: ignore[attr-defined]
        except ImportError:
            repair_on_open = None
        if repair_on_open is None:
            raise OpenError("qcow2: image is dirty (lazy refcounts were not written back) and cannot be repaired "
                            "here yet; open it read-only or run 'qemu-img check -r all'")
        await repair_on_open(self)
        await self.img.clear_dirty()

    async def _clean_loop(self, interval: int) -> None:
        while True:
            await asyncio.sleep(interval)
            self.img.l2_cache.clear_clean()
            self.img.rc.cache.clear_clean()

    def set_backing(self, child: Any) -> None:
        """The backing edge changed while open (blockdev-snapshot, blockdev-reopen): COW and reads follow it."""
        self.backing = child

    async def close(self) -> None:
        if self._clean_task is not None:
            self._clean_task.cancel()
        await store_bitmaps(self)  # before the file goes: bitmaps written back in place, in_use cleared
        if not self.read_only:
            try:
                await self.img.flush_metadata()
                if self.img.dirty_set:
                    await self.img.clear_dirty()
            except (BlockIOError, ImageCorrupt):
                pass

    async def getlength(self) -> int:
        return self.img.h.size

    # ------------------------------------------------------------ reads

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        img = self.img
        n = len(buf)
        pos = 0
        while pos < n:
            m = await img.lookup(offset + pos, n - pos)
            chunk = buf if pos == 0 and m.length == n else buf[pos:pos + m.length]
            t = m.type
            if t == ClusterType.NORMAL:
                await self.data.preadv(m.host, chunk)
            elif t in _UNALLOC:
                if self.backing is not None:
                    await self.backing.preadv(offset + pos, chunk)
                else:
                    chunk[:] = bytes(len(chunk))
            elif t in _ZERO:
                chunk[:] = bytes(len(chunk))
            else:
                data = await self._read_compressed(m.host)
                start = (offset + pos) & (self.cluster_size - 1)
                chunk[:] = data[start:start + len(chunk)]
            pos += m.length

    async def _read_compressed(self, entry: int) -> bytes:
        cached = self._decompressed
        if cached is not None and cached[0] == entry:
            return cached[1]
        off, nbytes = self.img.compressed_range(entry)
        if off + nbytes > self.file.getlength() + 512 * 2 or nbytes > 2 * self.cluster_size + 1024:
            raise BlockIOError(errno.EIO, node=self.node.node_name, op="read", offset=off,
                               detail=f"compressed cluster descriptor {entry:#x} points outside the image")
        raw = bytearray(nbytes)
        await self.file.preadv(off, memoryview(raw))
        try:
            data = compress.decompress(self.img.h.compression_type, bytes(raw), self.cluster_size)
        except ValueError as e:
            raise BlockIOError(errno.EIO, node=self.node.node_name, op="read", offset=off,
                               detail=f"bad compressed cluster at host offset {off}: {e}") from None
        self._decompressed = (entry, data)
        return data

    async def block_status(self, offset: int, length: int, want_zero: bool) -> BlockStatus:
        m = await self.img.lookup(offset, length)
        t = m.type
        if t in _UNALLOC:
            return BlockStatus(Status.NONE, m.length)
        if t == ClusterType.ZERO_PLAIN:
            return BlockStatus(Status.ZERO, m.length)
        if t == ClusterType.ZERO_ALLOC:
            return BlockStatus(Status.ZERO | Status.OFFSET_VALID, m.length, m.host, self.data.node)
        if t == ClusterType.NORMAL:
            rec = Status.RECURSE if await self._metadata_preallocated() else Status.NONE
            return BlockStatus(Status.DATA | Status.OFFSET_VALID | rec, m.length, m.host, self.data.node)
        return BlockStatus(Status.DATA, m.length)

    async def _metadata_preallocated(self) -> bool:
        """QEMU's heuristic (qcow2_detect_metadata_preallocation), checked once: far more clusters have a
        refcount than the file has host space for. Only then does block status ask the file for zeros."""
        known = getattr(self, "_meta_prealloc", None)
        if known is None:
            getter = getattr(self.file.node.driver, "allocated_size", None)
            known = False
            if callable(getter):
                real = getter() // self.cluster_size
                threshold = max(real * 10 // 9, real + 2)
                end = -(-self.file.getlength() // self.cluster_size)
                count = 0
                for i in range(end):
                    if count >= threshold:
                        break
                    count += bool(await self.img.rc.get(i))
                known = count >= threshold
            self._meta_prealloc = known
        return known

    # ------------------------------------------------------------ flush / info

    async def flush_to_os(self) -> None:
        if not self.read_only:
            async with self.meta_lock:
                await self.img.flush_metadata()

    async def flush(self) -> None:
        """Metadata went out in flush_to_os; core flushes the file child next."""
        if self.data is not self.file:
            await self.data.flush()

    def info(self) -> dict[str, Any]:
        h = self.img.h
        data: dict[str, Any] = {"compat": "1.1" if h.version >= 3 else "0.10",
                                "compression-type": COMPRESSION_NAMES.get(h.compression_type, "zlib")}
        if h.version >= 3:
            data["lazy-refcounts"] = h.lazy_refcounts
            data.update(bitmaps_info(self))  # the bitmaps directory, as qemu-img info lists it
        data["refcount-bits"] = h.refcount_bits
        if h.version >= 3:
            if h.data_file is not None:
                data["data-file"] = h.data_file
            if h.incompatible_features & INCOMPAT_DATA_FILE:
                data["data-file-raw"] = h.data_file_raw
            data["corrupt"] = bool(h.incompatible_features & INCOMPAT_CORRUPT)
            data["extended-l2"] = h.extended_l2
        out: dict[str, Any] = {"cluster-size": h.cluster_size, "dirty-flag": h.dirty,
                               "format-specific": {"type": "qcow2", "data": data}}
        if h.backing_file:
            out["backing-filename"] = h.backing_file
            if self.backing is not None:
                out["full-backing-filename"] = self.backing.node.filename
            if h.backing_format:
                out["backing-filename-format"] = h.backing_format
        snaps = self._snapshot_infos()
        if snaps:
            out["snapshots"] = snaps
        return out

    def _snapshot_infos(self) -> list[dict[str, Any]] | None:
        """Snapshots for ``img info``, from snapshot.py when the other half of the plugin provides it."""
        fn = getattr(self, "snapshot_info_list", None)
        return fn() if callable(fn) else None

    @classmethod
    async def create(cls, session: Any, filename: str, options: Qcow2CreateOptions) -> None:
        from .create import create_image

        await create_image(session, filename, options)


def _now() -> float:
    return time.time()
