"""The driver interface: a small required protocol plus optional capabilities.

The generic layer (:mod:`blockgraph.io`) guarantees every driver method its
preconditions, so drivers never re-check them:

* ``offset`` and ``len(buf)`` are multiples of ``limits.request_alignment``;
* no request is larger than ``limits.max_transfer`` (when non-zero);
* every request lies inside ``[0, getlength())`` (except ``truncate``);
* writes only reach a driver whose node holds the write permission;
* with ``concurrency = SERIALIZE_REQUESTS`` (the default) at most one data
  method runs at a time per node.

Optional methods and their fallbacks, detected once at open:

``pwritev``, ``flush``  -- without them the node is read-only.
``pwrite_zeroes``       -- zeroing is emulated by writing a zero buffer; raising
                           :class:`~blockgraph.errors.NotSupported` does the same.
``pdiscard``            -- discard is accepted and ignored (as QEMU).
``block_status``        -- everything is allocated data.
``truncate``            -- resizing fails with ENOTSUP.
``flush_to_os``         -- for formats that cache metadata: write it to the child.
``refresh_limits``      -- default limits (byte granularity, no maximum).
``child_perm``          -- QEMU's default rules by child role.
``check_perm`` / ``set_perm`` / ``abort_perm``
                        -- protocols that mirror permissions outside the process
                           (file locks).
``info``                -- format-specific lines for ``img info``.
``check``               -- ``img check``: async ``check(fix: CheckFix) -> CheckResult``, consistency check and
                           repair (:class:`CheckResult`).
``snapshot_create`` / ``snapshot_goto`` / ``snapshot_delete`` / ``snapshot_list``
                        -- internal snapshots (QEMU's bdrv_snapshot_*), all async: ``snapshot_create(sn:
                           SnapshotInfo)`` (the driver assigns ``id`` when empty), ``snapshot_goto(name_or_id)``,
                           ``snapshot_delete(snapshot_id, name)`` (either may be None), ``snapshot_list() ->
                           list[SnapshotInfo]``; optional ``snapshot_load_tmp(snapshot_id, name)`` shows a
                           snapshot read-only in place of the active layer (``convert -l``, ``measure -l``).
                           Errors: :class:`~blockgraph.errors.BlockGraphError` with the reason QEMU prints.
``save_vmstate`` / ``load_vmstate``
                        -- async ``(pos, buf: memoryview)``: the vm-state byte stream of savevm/loadvm.
``change_backing_file`` -- async ``(name: str | None, fmt: str | None)``: rewrite the backing file name and format
                           in the image header (``rebase``; QEMU's bdrv_change_backing_file).
``make_empty``          -- async: drop all data of this layer (``commit`` without ``-d``).
``set_backing``         -- sync ``set_backing(child: Child | None)``: the node's backing edge changed while it is
                           open (``blockdev-snapshot`` gives an overlay its backing node; ``blockdev-reopen``
                           attaches, replaces or drops one). Called drained, after the graph changed; the
                           driver takes ``child`` as its backing from now on (None: reads fall to zeros) and must
                           not fail. Drivers that read ``node.backing`` on every request need no hook; one that
                           keeps the child from ``open_backing`` implements it.
``amend``               -- async ``amend(values: dict[str, str], force: bool, warn)``: change create options of an
                           open image in place (``img amend``); ``values`` are the ``-o`` keys as given (checked
                           against ``CreateOptions``); ``warn(msg)`` prints a warning line.
classmethod ``measure`` -- async ``measure(values: dict[str, str], size: int | None, source: Node | None) ->
                           MeasureResult``: bytes a new image of this format needs (``img measure``).
classmethod ``create``  -- ``img create`` for this driver.
classmethod ``probe``   -- a score 0..100 from the first 2048 bytes.
classmethod ``parse_filename`` -- turn a filename/URL into options.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    from .node import NodeContext

API_VERSION = 1
SUPPORTED_API_VERSIONS = range(1, 2)


class DriverKind(enum.Enum):
    FORMAT = "format"
    PROTOCOL = "protocol"
    FILTER = "filter"


class Concurrency(enum.Enum):
    SERIALIZE_REQUESTS = "serialize_requests"
    PARALLEL = "parallel"


class ReqFlags(enum.IntFlag):
    """Request flags (QEMU's BdrvRequestFlags)."""

    NONE = 0
    FUA = 0x01
    MAY_UNMAP = 0x02
    NO_FALLBACK = 0x04
    WRITE_UNCHANGED = 0x08
    ZERO_WRITE = 0x10  # a write that came from zero detection or emulated zeroing
    COPY_ON_READ = 0x20
    WRITE_COMPRESSED = 0x40  # store compressed (img convert -c); cluster-aligned, formats opt in


class Status(enum.IntFlag):
    """Block status flags (BDRV_BLOCK_*)."""

    NONE = 0
    DATA = 0x01
    ZERO = 0x02
    OFFSET_VALID = 0x04
    ALLOCATED = 0x10
    EOF = 0x20
    # Without DATA: "my file child at `offset` answers for me" (BDRV_BLOCK_RAW: raw, fixed vpc).
    # With DATA | OFFSET_VALID: "ask my file where this data reads as zeros" (BDRV_BLOCK_RECURSE: flat vmdk
    # extents, qcow2 with metadata preallocation); other data extents are reported as they are, as QEMU does.
    RECURSE = 0x40


@attrs.frozen(slots=True)
class BlockStatus:
    """The status of ``[offset, offset+length)``: ``flags``, and where the data lives."""

    flags: Status
    length: int
    offset: int | None = None  # host offset in ``file``
    file: Any = None  # the Node holding the data, when OFFSET_VALID


@attrs.frozen
class BlockLimits:
    """QEMU's BlockLimits; 0 means "no limit" or "no preference"."""

    request_alignment: int = 1
    max_transfer: int = 0
    opt_transfer: int = 0
    pdiscard_alignment: int = 0
    max_pdiscard: int = 0
    pwrite_zeroes_alignment: int = 0
    max_pwrite_zeroes: int = 0
    min_mem_alignment: int = 1
    opt_mem_alignment: int = 1


class PreallocMode(enum.Enum):
    OFF = "off"
    METADATA = "metadata"
    FALLOC = "falloc"
    FULL = "full"


class CheckFix(enum.IntFlag):
    """What ``img check -r`` may repair (QEMU's BdrvCheckMode)."""

    NONE = 0
    LEAKS = 1
    ERRORS = 2


@attrs.define
class CheckResult:
    """What a driver's ``check(fix)`` found (QEMU's BdrvCheckResult); counts are in clusters/blocks.

    ``messages`` are the per-problem lines qemu-img prints on stderr (``Leaked cluster 5 refcount=1 reference=0``).
    """

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = attrs.Factory(list)


@attrs.define
class SnapshotInfo:
    """One internal snapshot (QEMU's QEMUSnapshotInfo); ``icount`` None when unknown (-1 on disk)."""

    id: str = ""
    name: str = ""
    vm_state_size: int = 0
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    icount: int | None = None
    disk_size: int | None = None  # the virtual size when the snapshot was taken, if recorded


@attrs.frozen
class MeasureResult:
    """What ``img measure`` prints (QEMU's BlockMeasureInfo); ``bitmaps`` None: the format has none."""

    required: int
    fully_allocated: int
    bitmaps: int | None = None


@runtime_checkable
class BlockDriver(Protocol):
    """What every driver has."""

    name: ClassVar[str]
    kind: ClassVar[DriverKind]
    api_version: ClassVar[int]
    Options: ClassVar[type]

    async def open(self, node: NodeContext, options: Any) -> None: ...
    async def close(self) -> None: ...
    async def getlength(self) -> int: ...
    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None: ...


@runtime_checkable
class Writable(Protocol):
    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None: ...
    async def flush(self) -> None: ...


@runtime_checkable
class ZeroWriter(Protocol):
    async def pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None: ...


@runtime_checkable
class Discarder(Protocol):
    async def pdiscard(self, offset: int, length: int) -> None: ...


@runtime_checkable
class BlockStatusReporter(Protocol):
    async def block_status(self, offset: int, length: int, want_zero: bool) -> BlockStatus: ...


@runtime_checkable
class Truncatable(Protocol):
    async def truncate(self, length: int, exact: bool, prealloc: PreallocMode) -> None: ...


@attrs.frozen
class Capabilities:
    """What a driver class implements, computed once per class."""

    write: bool
    zero: bool
    discard: bool
    block_status: bool
    truncate: bool
    flush_to_os: bool
    create: bool
    probe: bool
    info: bool
    perm_hooks: bool
    reopen: bool
    check: bool
    snapshot: bool = False
    vmstate: bool = False
    change_backing_file: bool = False
    make_empty: bool = False
    amend: bool = False
    measure: bool = False
    set_backing: bool = False

    @classmethod
    def of(cls, drv: type) -> Capabilities:
        def has(*names: str) -> bool:
            return all(callable(getattr(drv, n, None)) for n in names)

        return cls(
            write=has("pwritev", "flush"), zero=has("pwrite_zeroes"), discard=has("pdiscard"),
            block_status=has("block_status"), truncate=has("truncate"), flush_to_os=has("flush_to_os"),
            create=has("create"), probe=has("probe"), info=has("info"),
            perm_hooks=has("check_perm", "set_perm", "abort_perm"),
            reopen=has("reopen_prepare", "reopen_commit", "reopen_abort"), check=has("check"),
            snapshot=has("snapshot_create", "snapshot_goto", "snapshot_delete", "snapshot_list"),
            vmstate=has("save_vmstate", "load_vmstate"), change_backing_file=has("change_backing_file"),
            make_empty=has("make_empty"), amend=has("amend"), measure=has("measure"),
            set_backing=has("set_backing"),
        )

    def lines(self) -> list[str]:
        return [f"has_{k}={int(v)}" for k, v in attrs.asdict(self).items()]


def __getattr__(name: str) -> Any:
    """``from blockgraph.driver import NodeContext`` works too (it lives in node.py, which imports this module)."""
    if name == "NodeContext":
        from .node import NodeContext

        return NodeContext
    raise AttributeError(f"module 'blockgraph.driver' has no attribute {name!r}")
