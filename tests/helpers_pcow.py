"""``pcow``: a tiny persistent copy-on-write format for testing the generic img subcommands.

Loaded with ``blockgraph --plugin tests/helpers_pcow.py img ...``. Layout: a 4 KiB header
(magic, size, cluster size, backing name and format, a JSON snapshot list, an allocation
bitmap), then cluster ``c`` at ``4096 + c * cluster``. It implements every optional hook
the img subcommands use: check (bitmap bits past the disk end are "leaks", a nonzero
``corrupt`` byte a corruption), snapshots (metadata only: goto checks the name), make_empty,
change_backing_file, amend (``size``), measure.
"""

from __future__ import annotations

import json
import struct
from typing import Any, ClassVar

import attrs
from blockgraph import hookimpl
from blockgraph.driver import (
    BlockStatus,
    CheckFix,
    CheckResult,
    DriverKind,
    MeasureResult,
    PreallocMode,
    ReqFlags,
    SnapshotInfo,
    Status,
)
from blockgraph.errors import BlockGraphError, BlockIOError, OpenError
from blockgraph.options import opt, optional, parse_size, parse_str
from blockgraph.perms import ChildRole

MAGIC = b"PCOW\x00\x00\x00\x01"
HDR = 4096
BITMAP_AT, BITMAP_LEN = 2048, 2048
SNAP_AT = 512
CORRUPT_AT = 300


@attrs.frozen(kw_only=True)
class PcowOptions:
    pass


@attrs.frozen(kw_only=True)
class PcowCreateOptions:
    size: int = opt(converter=parse_size, help="Virtual disk size")
    backing_file: str | None = opt(None, converter=optional(parse_str), help="File name of a base image")
    backing_fmt: str | None = opt(None, converter=optional(parse_str), help="Image format of the base image")
    cluster_size: int = opt(4096, converter=parse_size, help="cluster size")


def _header(size: int, cluster: int, backing: str, fmt: str) -> bytearray:
    hdr = bytearray(HDR)
    hdr[0:24] = MAGIC + struct.pack(">QI4x", size, cluster)
    hdr[32:32 + len(backing)] = backing.encode()
    hdr[256:256 + len(fmt)] = fmt.encode()
    hdr[SNAP_AT:SNAP_AT + 4] = b"\x00\x02[]"
    return hdr


class PcowDriver:
    name: ClassVar[str] = "pcow"
    kind: ClassVar[DriverKind] = DriverKind.FORMAT
    api_version: ClassVar[int] = 1
    child_options: ClassVar[tuple[str, ...]] = ("file", "backing")
    Options: ClassVar[type] = PcowOptions
    CreateOptions: ClassVar[type] = PcowCreateOptions
    amend_options: ClassVar[tuple[str, ...]] = ("size",)

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        return 100 if header.startswith(MAGIC) else 0

    async def open(self, node: Any, options: PcowOptions) -> None:
        self.node = node
        self.file = await node.open_child("file", ChildRole.IMAGE)
        self.hdr = bytearray(HDR)
        await self.file.preadv(0, memoryview(self.hdr))
        if not self.hdr.startswith(MAGIC):
            raise OpenError("not a pcow image")
        self.size, self.cluster = struct.unpack_from(">QI", self.hdr, 8)
        self.backing_file = self.hdr[32:256].rstrip(b"\0").decode() or None
        self.backing_fmt = self.hdr[256:288].rstrip(b"\0").decode() or None
        self.backing = await node.open_backing(self.backing_file, self.backing_fmt)
        node.set_limits(request_alignment=self.cluster)

    def set_backing(self, child: Any) -> None:
        """The node's backing edge changed while open (blockdev-snapshot, blockdev-reopen): read through it."""
        self.backing = child

    async def close(self) -> None:
        pass

    async def getlength(self) -> int:
        return self.size

    # ---------------------------------------------------------------- data

    def _bit(self, c: int) -> bool:
        return bool(self.hdr[BITMAP_AT + c // 8] >> (c % 8) & 1)

    async def _set_bits(self, first: int, last: int, value: bool) -> None:
        for c in range(first, last):
            if value:
                self.hdr[BITMAP_AT + c // 8] |= 1 << (c % 8)
            else:
                self.hdr[BITMAP_AT + c // 8] &= ~(1 << (c % 8)) & 0xFF
        await self.file.pwritev(0, memoryview(self.hdr))

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        cs = self.cluster
        for pos in range(0, len(buf), cs):
            chunk = buf[pos:pos + cs]
            guest = offset + pos
            if self._bit(guest // cs):
                await self.file.preadv(HDR + guest, chunk)
            elif self.backing is not None and guest < self.backing.getlength():
                n = min(len(chunk), self.backing.getlength() - guest)
                await self.backing.preadv(guest, chunk[:n])
                chunk[n:] = bytes(len(chunk) - n)
            else:
                chunk[:] = bytes(len(chunk))

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        await self.file.pwritev(HDR + offset, buf)
        await self._set_bits(offset // self.cluster, -(-(offset + len(buf)) // self.cluster), True)

    async def flush(self) -> None:
        pass

    async def block_status(self, offset: int, length: int, want_zero: bool) -> BlockStatus:
        cs = self.cluster
        state = self._bit(offset // cs)
        pos = (offset // cs + 1) * cs
        while pos < offset + length and self._bit(pos // cs) == state:
            pos += cs
        n = min(pos, offset + length) - offset
        if state:
            return BlockStatus(Status.DATA | Status.OFFSET_VALID, n, HDR + offset, self.file.node)
        return BlockStatus(Status.NONE, n)

    async def truncate(self, length: int, exact: bool, prealloc: PreallocMode) -> None:
        self.size = length
        struct.pack_into(">Q", self.hdr, 8, length)
        await self.file.pwritev(0, memoryview(self.hdr))

    # ---------------------------------------------------------------- optional hooks

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cluster-size": self.cluster}
        if self.backing_file:
            out["backing-filename"] = self.backing_file
            out["backing-filename-format"] = self.backing_fmt
        return out

    async def reopen_prepare(self, options: PcowOptions, read_only: bool) -> None:
        pass

    async def reopen_commit(self) -> None:
        pass

    async def reopen_abort(self) -> None:
        pass

    async def make_empty(self) -> None:
        self.hdr[BITMAP_AT:BITMAP_AT + BITMAP_LEN] = bytes(BITMAP_LEN)
        await self.file.pwritev(0, memoryview(self.hdr))

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        self.hdr[32:288] = bytes(256)
        self.hdr[32:32 + len(name or "")] = (name or "").encode()
        self.hdr[256:256 + len(fmt or "")] = (fmt or "").encode()
        self.backing_file, self.backing_fmt = name, fmt
        await self.file.pwritev(0, memoryview(self.hdr))

    async def check(self, fix: CheckFix) -> CheckResult:
        res = CheckResult()
        total = -(-self.size // self.cluster)
        res.total_clusters = total
        res.allocated_clusters = sum(self._bit(c) for c in range(total))
        leaks = [c for c in range(total, BITMAP_LEN * 8) if self._bit(c)]
        for c in leaks:
            res.messages.append(f"Leaked cluster {c} refcount=1 reference=0")
        res.leaks = len(leaks)
        if self.hdr[CORRUPT_AT]:
            res.corruptions = 1
            res.messages.append("ERROR cluster 0 refcount=0 reference=1")
        if leaks and fix & CheckFix.LEAKS:
            for c in leaks:
                self.hdr[BITMAP_AT + c // 8] &= ~(1 << (c % 8)) & 0xFF
            res.leaks_fixed, res.leaks = len(leaks), 0
        if res.corruptions and fix & CheckFix.ERRORS:
            self.hdr[CORRUPT_AT] = 0
            res.corruptions_fixed, res.corruptions = 1, 0
        if res.leaks_fixed or res.corruptions_fixed:
            await self.file.pwritev(0, memoryview(self.hdr))
        res.image_end_offset = HDR + total * self.cluster
        return res

    def _snapshots(self) -> list[dict[str, Any]]:
        n = struct.unpack_from(">H", self.hdr, SNAP_AT)[0]
        return json.loads(bytes(self.hdr[SNAP_AT + 2:SNAP_AT + 2 + n]))

    async def _save_snapshots(self, snaps: list[dict[str, Any]]) -> None:
        text = json.dumps(snaps).encode()
        if len(text) > BITMAP_AT - SNAP_AT - 2:
            raise BlockIOError(28, op="snapshot")
        self.hdr[SNAP_AT:BITMAP_AT] = bytes(BITMAP_AT - SNAP_AT)
        self.hdr[SNAP_AT:SNAP_AT + 2 + len(text)] = struct.pack(">H", len(text)) + text
        await self.file.pwritev(0, memoryview(self.hdr))

    async def snapshot_list(self) -> list[SnapshotInfo]:
        return [SnapshotInfo(**s) for s in self._snapshots()]

    async def snapshot_create(self, sn: SnapshotInfo) -> None:
        snaps = self._snapshots()
        sn.id = str(max((int(s["id"]) for s in snaps), default=0) + 1)
        snaps.append(attrs.asdict(sn))
        await self._save_snapshots(snaps)

    async def snapshot_goto(self, name: str) -> None:
        if not any(name in (s["id"], s["name"]) for s in self._snapshots()):
            raise BlockIOError(2, op="snapshot")

    async def snapshot_delete(self, snapshot_id: str | None, name: str | None) -> None:
        await self._save_snapshots([s for s in self._snapshots() if s["id"] != snapshot_id])

    async def amend(self, values: dict[str, str], force: bool, warn: Any) -> None:
        if "size" in values:
            new = parse_size(values["size"])
            if new < self.size and not force:
                raise BlockGraphError("Cannot shrink without --force")
            await self.truncate(new, True, PreallocMode.OFF)

    @classmethod
    async def measure(cls, values: dict[str, str], size: int | None, source: Any) -> MeasureResult:
        cs = parse_size(values.get("cluster_size", "4096"))
        total = source.length if source is not None else parse_size(values.get("size", "0"))
        return MeasureResult(HDR, HDR + -(-total // cs) * cs, 0 if source is not None else None)

    @classmethod
    async def create(cls, session: Any, filename: str, options: PcowCreateOptions) -> None:
        with open(filename, "wb") as f:
            f.write(_header(options.size, options.cluster_size, options.backing_file or "",
                            options.backing_fmt or ""))


@hookimpl
def blockgraph_register_drivers(register: Any) -> None:
    register(PcowDriver, probe=True)


def pimg(*args: str) -> Any:
    """``blockgraph --plugin helpers_pcow.py img ARGS...`` in this process (a helpers_img.Result)."""
    import contextlib
    import io

    from blockgraph.cli.main import main
    from helpers_img import Result

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--plugin", __file__, "img", *args])
    return Result(rc, out.getvalue(), err.getvalue())


def pio(*args: str) -> Any:
    """``blockgraph --plugin helpers_pcow.py io ARGS...`` in this process."""
    import contextlib
    import io

    from blockgraph.cli.main import main
    from helpers_img import Result

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--plugin", __file__, "io", *args])
    return Result(rc, out.getvalue(), err.getvalue())


def pcow_chain(tmp: Any, *layers: dict[int, bytes], size: int = 1 << 20) -> list[str]:
    """Files l0.pc (base) .. lN.pc, each backed by the previous, with ``{offset: data}`` written into each."""
    import os

    names = []
    for i, extents in enumerate(layers):
        name = os.path.join(str(tmp), f"l{i}.pc")
        backing = [] if i == 0 else ["-b", f"l{i - 1}.pc", "-F", "pcow"]
        assert pimg("create", "-q", "-f", "pcow", *backing, name, str(size)).rc == 0
        for off, data in extents.items():
            assert pio("-f", "pcow", "-c", f"write -P {data[0]} {off} {len(data)}", name).rc == 0
        names.append(name)
    return names
