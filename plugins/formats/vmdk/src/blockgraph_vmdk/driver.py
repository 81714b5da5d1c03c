"""The vmdk format driver: one disk made of extents, described by a text descriptor."""

from __future__ import annotations

import bisect
import errno
import random
from typing import Any, ClassVar

import attrs
from blockgraph.driver import BlockStatus, CheckFix, CheckResult, Concurrency, DriverKind, ReqFlags, Status
from blockgraph.errors import BlockIOError, NotSupported, OpenError
from blockgraph.options import opt, parse_bool
from blockgraph.perms import ChildRole, Perm, default_child_perm

from . import descriptor as dsc
from .create import VmdkCreateOptions, create
from .extent import DATA, FLAT, UNALLOC, ZEROED, Extent, FlatExtent, ZeroExtent
from .format import DESC_MAX, MAGIC_COWD, MAGIC_KDMV, SECTOR
from .format import probe as probe_header
from .open_sparse import open_sparse
from .paths import ALLOW_OPTION, child_spec, extent_path
from .rwlock import RWLock
from .sesparse import SeSparseExtent, is_sesparse, open_se_sparse
from .sparse import SparseExtent

DESC_REGION = 20 * SECTOR  # what QEMU reads and rewrites of an embedded descriptor


@attrs.frozen(kw_only=True)
class VmdkOptions:
    allow_external_extents: bool = opt(
        False, key=ALLOW_OPTION, converter=parse_bool,
        help="open extent files outside the descriptor's directory (absolute paths, '..', symlinks leading out)")


class VmdkCheckFailed(BlockIOError):
    """``img check`` found a grain outside its file: QEMU fails the check with EINVAL after its ERROR line."""

    def __init__(self, result: CheckResult, node: str) -> None:
        super().__init__(errno.EINVAL, node=node, op="check", detail=result.messages[-1])
        self.result = result
        self.check_messages = result.messages  # img check prints them before "Check failed"


class VmdkDriver:
    name: ClassVar[str] = "vmdk"
    kind: ClassVar[DriverKind] = DriverKind.FORMAT
    api_version: ClassVar[int] = 1
    child_options: ClassVar[tuple[str, ...]] = ("file", "backing")
    concurrency: ClassVar[Concurrency] = Concurrency.PARALLEL  # reads share self.lock, writes take it alone
    supports_backing: ClassVar[bool] = True
    Options: ClassVar[type] = VmdkOptions
    CreateOptions: ClassVar[type] = VmdkCreateOptions
    create_shown_defaults: ClassVar[dict[str, str]] = {"compat6": "off", "hwversion": "undefined"}

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        return probe_header(header)

    create = classmethod(create)

    # ------------------------------------------------------------ open / close

    async def open(self, node: Any, options: VmdkOptions) -> None:
        self.node = node
        self.options = options
        self.lock = RWLock()
        self.extents: list[Extent] = []
        self.readonly_children: set[str] = set()
        self.cid_updated = False
        self.cid_checked = False
        self.file = await node.open_child("file", ChildRole.IMAGE)
        flen = self.file.getlength()
        if flen < 4:
            raise OpenError("File is too small, not a valid image")
        head = bytearray(min(flen, SECTOR))
        await self.file.preadv(0, memoryview(head))
        if head[:4] in (MAGIC_KDMV, MAGIC_COWD):
            await self._open_monolithic(bytes(head), flen)
        else:
            raw = bytearray(min(flen, DESC_MAX))
            await self.file.preadv(0, memoryview(raw))
            self.desc_at, self.desc_region = 0, None
            await self._open_descriptor_file(dsc.parse(dsc.decode(raw)))
        self.cid = self.desc.cid("CID")
        self.parent_cid = self.desc.cid("parentCID")
        self.backing = await node.open_backing(self.desc.parent_hint, "vmdk" if self.desc.parent_hint else None)
        grains = [e.grain for e in self.extents if isinstance(e, SparseExtent)]
        if grains:
            node.set_limits(pwrite_zeroes_alignment=max(grains))
        self.starts = [e.start for e in self.extents]
        self.length = self.extents[-1].end if self.extents else 0

    async def _open_monolithic(self, head: bytes, flen: int) -> None:
        """A sparse file holding the descriptor (monolithicSparse, streamOptimized) or only a descriptor."""
        from .format import SparseHeader

        hdr = SparseHeader.parse(head)
        self.desc_at = (hdr.desc_offset if hdr.desc_offset and not hdr.cowd else 1) * SECTOR
        self.desc_region = min(DESC_REGION if hdr.cowd or not hdr.desc_size else hdr.desc_size * SECTOR, DESC_MAX)
        avail = min(self.desc_region, max(0, flen - self.desc_at))
        raw = bytearray(avail)
        if avail:
            await self.file.preadv(self.desc_at, memoryview(raw))
        text = dsc.decode(raw)
        self.desc = dsc.parse(text)
        if not hdr.cowd and hdr.capacity == 0 and hdr.desc_offset:
            await self._open_descriptor_file(self.desc)  # a sparse file that only carries a descriptor
            return
        if "createType" not in self.desc.fields:
            raise OpenError("invalid VMDK image descriptor")
        writable = not self.node.read_only
        ext = await open_sparse(self.file, head, start=0, access="RW", type_name="", writable=writable,
                                node_name=self.node.node_name)
        ext.run_blocking = self.node.run_blocking
        self.extents.append(ext)
        self.create_type = "streamOptimized" if ext.compressed else (
            "vmfsSparse" if hdr.cowd else "monolithicSparse")

    async def _open_descriptor_file(self, desc: dsc.Descriptor) -> None:
        self.desc = desc
        ct = desc.create_type
        if ct is None:
            raise OpenError("invalid VMDK image descriptor")
        if ct not in dsc.DESCRIPTOR_TYPES:
            raise OpenError(f"Unsupported image type '{ct}'")
        self.create_type = ct
        registry = self.node.graph_node.session.registry
        descriptor_name = self.file.node.filename
        start = 0
        for i, line in enumerate(desc.extents):
            if line.type not in dsc.KNOWN_TYPES:
                raise OpenError(f"Unsupported extent type '{line.type}'")
            common = {"start": start, "access": line.access, "type_name": line.type,
                      "node_name": self.node.node_name}
            if line.type == "ZERO":
                ext: Extent = ZeroExtent(length=line.sectors * SECTOR, child=None, **common)
            else:
                path = extent_path(descriptor_name, line.filename or "", registry,
                                   self.options.allow_external_extents)
                ext = await self._open_extent_file(i, line, path, registry, common)
            self.extents.append(ext)
            start = ext.end

    async def _open_extent_file(self, i: int, line: dsc.ExtentLine, path: str, registry: Any,
                                common: dict[str, Any]) -> Extent:
        name = f"extents.{i}"
        if line.access == "NOACCESS":
            ext = ZeroExtent(length=line.sectors * SECTOR, child=None, **common)
            ext.path = path
            return ext
        read_only = line.access != "RW" or self.node.read_only
        if line.access != "RW":
            self.readonly_children.add(name)  # never written, even after a reopen read-write
        flat = line.type in dsc.FLAT_TYPES
        role = ChildRole.DATA if flat else ChildRole.DATA | ChildRole.METADATA
        try:
            child = await self.node.open_child(name, role, default=child_spec(path, registry, read_only))
        except OpenError as e:
            raise OpenError(f"Could not open VMDK extent '{line.filename}' of '{self.file.node.filename}': "
                            f"{e}") from None
        if flat:
            return FlatExtent(base=line.offset * SECTOR, length=line.sectors * SECTOR, child=child, **common)
        flen = child.getlength()
        head = bytearray(min(flen, SECTOR))
        if flen:
            await child.preadv(0, memoryview(head))
        if line.type == "SESPARSE":
            if not is_sesparse(head):
                raise OpenError(f"VMDK extent '{path}' is not a seSparse extent")
            return await open_se_sparse(child, bytes(head), writable=not read_only, **common)
        if flen < 4 or head[:4] not in (MAGIC_KDMV, MAGIC_COWD):
            raise OpenError(f"VMDK extent '{path}' is not a sparse extent: Image not in VMDK format")
        ext = await open_sparse(child, bytes(head), writable=not read_only, **common)
        ext.run_blocking = self.node.run_blocking
        return ext

    def child_perm(self, name: str, role: ChildRole, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        want, share = default_child_perm(role, perm, shared, writable=not self.node.read_only)
        if name in getattr(self, "readonly_children", ()):
            want &= ~(Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE)
        return want, share

    def set_backing(self, child: Any) -> None:
        """The node's backing edge changed while open (blockdev-snapshot, blockdev-reopen): read through it."""
        self.backing = child

    async def close(self) -> None:
        """Streams get their last grain, footer and end-of-stream marker (core has flushed everything else)."""
        for ext in getattr(self, "extents", []):
            if isinstance(ext, SparseExtent) and ext.compressed and (ext.pending or ext.appended):
                await ext.close()
                await ext.child.flush()
        self.extents = []

    async def getlength(self) -> int:
        return self.length

    # ------------------------------------------------------------ reopen (read-only <-> read-write)

    async def reopen_prepare(self, options: VmdkOptions, read_only: bool) -> None:
        self._reopen_next: list[tuple[SparseExtent, int]] = []
        sparse = [e for e in self.extents if isinstance(e, SparseExtent) and e.access == "RW"]
        if read_only:
            async with self.lock.write():
                for ext in sparse:
                    await ext.close()  # the last grain and the stream footer, while writes are still allowed
            return
        for ext in sparse:
            if isinstance(ext, SeSparseExtent):
                raise OpenError("No write support for seSparse images available")
            if ext.hdr.version == 3 and not ext.compressed and not ext.hdr.cowd:
                raise OpenError("VMDK version 3 must be read only")
            if ext.compressed:
                sectors = (ext.child.getlength() + 511) // 512
                self._reopen_next.append((ext, await ext.before_footer(sectors)))

    async def reopen_commit(self) -> None:
        for ext, next_sector in self._reopen_next:
            ext.next_sector = next_sector
        self.cid_updated = False

    async def reopen_abort(self) -> None:
        self._reopen_next = []

    # ------------------------------------------------------------ I/O

    def _pieces(self, offset: int, length: int) -> list[tuple[Extent, int, int, int]]:
        """(extent, offset in it, offset in the request, bytes) covering the request."""
        out = []
        done = 0
        i = bisect.bisect_right(self.starts, offset) - 1
        while done < length:
            ext = self.extents[i]
            rel = offset + done - ext.start
            n = min(length - done, ext.length - rel)
            out.append((ext, rel, done, n))
            done += n
            i += 1
        return out

    async def _base(self, voff: int, buf: memoryview) -> None:
        """What an unallocated grain holds: the backing file's data, or zeros."""
        if self.node.backing is None:
            buf[:] = bytes(len(buf))
            return
        self._check_parent_cid(voff, len(buf))
        backing = self.node.backing
        avail = max(0, min(len(buf), backing.getlength() - voff))
        if avail:
            await backing.preadv(voff, buf[:avail])
        if avail < len(buf):
            buf[avail:] = bytes(len(buf) - avail)

    def _check_parent_cid(self, voff: int, length: int) -> None:
        """QEMU refuses to read through a parent whose CID is not this image's parentCID."""
        if self.cid_checked:
            return
        parent = self.node.backing.node
        pcid = getattr(parent.driver, "cid", None) if parent.driver_name == "vmdk" else None
        if pcid != self.parent_cid:
            raise BlockIOError(errno.EINVAL, node=self.node.node_name, op="read", offset=voff, length=length,
                               detail=f"parentCID {self.parent_cid:x} does not match the CID of the backing file "
                                      f"'{parent.filename}'" + (f" ({pcid:x})" if pcid is not None else
                                                                " (not a vmdk image)"))
        self.cid_checked = True

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        async with self.lock.read():
            return await self._preadv(offset, buf, flags)

    async def _preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        for ext, rel, at, n in self._pieces(offset, len(buf)):
            ext.refuse("read", offset + at, n)
            piece = buf[at:at + n]
            if isinstance(ext, SparseExtent):
                await ext.read(rel, piece, self._base)
            else:
                await ext.read(rel, piece)

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        async with self.lock.write():
            return await self._pwritev(offset, buf, flags)

    async def _pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        pieces = self._pieces(offset, len(buf))
        for ext, _rel, at, n in pieces:
            ext.refuse("write", offset + at, n)
        await self._update_cid()
        for ext, rel, at, n in pieces:
            piece = buf[at:at + n]
            if isinstance(ext, SparseExtent):
                await ext.write(rel, piece, self._base, flags)
            else:
                await ext.write(rel, piece, flags)

    async def pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        async with self.lock.write():
            return await self._pwrite_zeroes(offset, length, flags)

    async def _pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        pieces = self._pieces(offset, length)
        has_backing = self.node.backing is not None
        for ext, rel, at, n in pieces:
            ext.refuse("write", offset + at, n)
            ok = await (ext.write_zeroes(rel, n, has_backing, True) if isinstance(ext, SparseExtent)
                        else ext.write_zeroes(rel, n, flags, True))
            if not ok:
                raise NotSupported("vmdk writes zeroes only as whole zeroed grains")
        await self._update_cid()
        for ext, rel, _at, n in pieces:
            if isinstance(ext, SparseExtent):
                await ext.write_zeroes(rel, n, has_backing, False)
            else:
                await ext.write_zeroes(rel, n, flags, False)

    async def _update_cid(self) -> None:
        """A new CID on the first write after open (what tells a child that its parent changed)."""
        if self.cid_updated:
            return
        cid = random.getrandbits(32)
        text = dsc.with_cid(self.desc.text, cid)
        raw = dsc.encode(text)
        if self.desc_region is None:
            await self.file.pwritev(0, memoryview(raw))
            if self.file.getlength() > len(raw):
                await self.file.truncate(len(raw))
        else:
            region = min(self.desc_region, self.file.getlength() - self.desc_at)
            if len(raw) > region:
                raise BlockIOError(errno.ENOSPC, node=self.node.node_name, op="write",
                                   detail="the descriptor with its new CID does not fit its space")
            await self.file.pwritev(self.desc_at, memoryview(raw.ljust(region, b"\0")))
        self.desc.text = text
        self.cid = cid
        self.cid_updated = True

    async def flush_to_os(self) -> None:
        async with self.lock.write():
            for ext in self.extents:
                if isinstance(ext, SparseExtent) and ext.pending is not None:
                    await ext.commit()

    async def flush(self) -> None:
        """Table writes go straight to the files; core flushes them next."""

    async def block_status(self, offset: int, length: int, want_zero: bool) -> BlockStatus:
        async with self.lock.read():
            return await self._block_status(offset, length, want_zero)

    async def _block_status(self, offset: int, length: int, want_zero: bool) -> BlockStatus:
        ext, rel, _at, n = self._pieces(offset, length)[0]
        if isinstance(ext, FlatExtent):
            # QEMU asks a flat extent's file where it reads as zeros (BDRV_BLOCK_RECURSE), not a sparse one's.
            return BlockStatus(Status.DATA | Status.OFFSET_VALID | Status.RECURSE, n, ext.base + rel, ext.child.node)
        if not isinstance(ext, SparseExtent):
            return BlockStatus(Status.ZERO if ext.access != "NOACCESS" else Status.DATA, n)
        state, host, n = await ext.status(rel, n)
        if state == UNALLOC:
            return BlockStatus(Status.NONE, n)
        if state == ZEROED:
            return BlockStatus(Status.ZERO, n)
        if state == DATA and host is not None:
            return BlockStatus(Status.DATA | Status.OFFSET_VALID, n, host, ext.child.node)
        return BlockStatus(Status.DATA, n)

    def has_zero_init(self) -> bool:
        return all(e.kind != FLAT or e.child.node.driver_name == "file" for e in self.extents)

    # ------------------------------------------------------------ img info / check

    def info(self) -> dict[str, Any]:
        data: dict[str, Any] = {"create-type": self.create_type, "cid": self.cid, "parent-cid": self.parent_cid,
                                "extents": [self._extent_info(e) for e in self.extents]}
        out: dict[str, Any] = {"format-specific": {"type": "vmdk", "data": data}}
        first = self.extents[0] if self.extents else None
        same = all(_same_kind(first, e) for e in self.extents)
        if same and isinstance(first, SparseExtent):
            out["cluster-size"] = first.grain
        hint = self.desc.parent_hint
        if hint:
            out["backing-filename"] = hint
            out["backing-filename-format"] = "vmdk"
            if self.node.backing is not None:
                out["full-backing-filename"] = self.node.backing.node.filename
            else:  # backing=null: still say where it would be
                from blockgraph.backing import full_backing_filename

                try:
                    out["full-backing-filename"] = full_backing_filename(
                        self.file.node.filename, hint, self.node.graph_node.session.registry)
                except OpenError:
                    pass
        return out

    @staticmethod
    def _extent_info(e: Extent) -> dict[str, Any]:
        info: dict[str, Any] = {"filename": e.filename or getattr(e, "path", ""), "format": e.type_name,
                                "virtual-size": e.length}
        if isinstance(e, SparseExtent):
            info["cluster-size"] = e.grain
            if e.compressed:
                info["compressed"] = True
        return info

    def allocated_size(self) -> int | None:
        from blockgraph.cli.img_util import allocated_size

        total = allocated_size(self.file.node) or 0
        for e in self.extents:
            if e.child is not None and e.child is not self.file:
                total += allocated_size(e.child.node) or 0
        return total

    async def check(self, fix: CheckFix) -> CheckResult:
        """QEMU's vmdk_co_check: every allocated grain (and flat window) starts inside its file; no repair."""
        if fix:
            raise NotSupported("This image format does not support checks")
        result = CheckResult()
        for e in self.extents:
            if isinstance(e, SparseExtent):
                ok = await e.check(result.messages)
            elif isinstance(e, FlatExtent) and e.base >= e.child.getlength():
                result.messages.append(f"ERROR: cluster offset for sector {e.start // SECTOR} points after EOF")
                ok = False
            else:
                ok = True
            if not ok:
                result.corruptions += 1
                raise VmdkCheckFailed(result, self.node.node_name)
        return result


def _same_kind(a: Extent | None, b: Extent) -> bool:
    """QEMU's vmdk_extents_type_eq: one cluster size is reported only when every extent agrees."""
    if a is None:
        return False
    if a.kind != b.kind:
        return False
    if isinstance(a, SparseExtent) and isinstance(b, SparseExtent):
        return a.compressed == b.compressed and a.grain == b.grain
    return True

