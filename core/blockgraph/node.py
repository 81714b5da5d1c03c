"""The node graph: nodes, child edges, and permission updates as transactions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs

from . import io
from .driver import BlockLimits, BlockStatus, Capabilities, Concurrency, DriverKind, PreallocMode, ReqFlags
from .errors import BlockGraphError, BlockIOError, OpenError, PermissionConflict
from .perms import ChildRole, Perm, default_child_perm, perm_names

if TYPE_CHECKING:
    from .session import Session

EPERM, ENOTSUP = 1, 95


class Child:
    """One edge, parent -> node, with the role and the permissions the parent takes and shares.

    The I/O verbs go through the generic layer of ``node``; a driver calls
    ``await self.file.preadv(...)`` as QEMU calls ``bdrv_co_preadv(bs->file, ...)``.
    """

    __slots__ = ("name", "node", "parent", "perm", "role", "shared")

    def __init__(self, name: str, role: ChildRole, parent: Any, node: Node) -> None:
        self.name, self.role, self.parent, self.node = name, role, parent, node
        self.perm, self.shared = Perm.NONE, Perm.ALL

    def __repr__(self) -> str:
        return f"<Child {self.name!r} {describe_user(self.parent)} -> {self.node.name!r} perm={perm_names(self.perm)}>"

    # The data verbs; writes need the permission on this edge.
    def preadv(self, offset: int, buf: memoryview, flags: ReqFlags = ReqFlags.NONE):
        return io.preadv(self.node, offset, buf, flags)

    def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags = ReqFlags.NONE):
        self._need_write(offset, len(buf), flags)
        return io.pwritev(self.node, offset, buf, flags)

    def pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags = ReqFlags.NONE):
        self._need_write(offset, length, flags)
        return io.pwrite_zeroes(self.node, offset, length, flags)

    def pdiscard(self, offset: int, length: int):
        self._need_write(offset, length, ReqFlags.NONE)
        return io.pdiscard(self.node, offset, length)

    def flush(self):
        return io.flush(self.node)

    def block_status(self, offset: int, length: int, want_zero: bool = True):
        return io.block_status(self.node, offset, length, want_zero)

    def getlength(self) -> int:
        return self.node.length

    async def truncate(self, length: int, exact: bool = False, prealloc: PreallocMode = PreallocMode.OFF):
        if not self.perm & Perm.RESIZE:
            raise BlockIOError(EPERM, node=self.node.name, op="truncate", detail="resize permission not taken")
        await io.truncate(self.node, length, exact, prealloc)

    def _need_write(self, offset: int, length: int, flags: ReqFlags) -> None:
        need = Perm.WRITE_UNCHANGED if flags & ReqFlags.WRITE_UNCHANGED else Perm.WRITE
        if not self.perm & (need | Perm.WRITE):
            raise BlockIOError(EPERM, node=self.node.name, op="write", offset=offset, length=length,
                               detail="Block node is read-only" if self.node.read_only else
                               f"{describe_user(self.parent)} has not taken the write permission")
        if offset + length > self.node.length and not self.perm & Perm.RESIZE:
            raise BlockIOError(EPERM, node=self.node.name, op="write", offset=offset, length=length,
                               detail=f"{describe_user(self.parent)} has not taken the resize permission "
                                      f"needed to write past the end")


def describe_user(user: Any) -> str:
    describe = getattr(user, "describe", None)
    return describe() if describe else repr(user)


@attrs.define(eq=False, repr=False)
class Node:
    """One driver instance in the graph (QEMU's BlockDriverState)."""

    name: str
    driver: Any
    session: Session
    kind: DriverKind
    read_only: bool = False
    generated_name: bool = False
    options: Any = None
    common: Any = None
    children: dict[str, Child] = attrs.Factory(dict)
    parents: list[Child] = attrs.Factory(list)
    limits: BlockLimits = attrs.Factory(BlockLimits)
    caps: Capabilities | None = None
    length: int = 0
    perm: Perm = Perm.NONE
    shared: Perm = Perm.ALL
    refcnt: int = 0
    probed_raw: bool = False
    check_mode: bool = False  # opened by ``img check`` (QEMU's BDRV_O_CHECK)
    filename: str = ""
    # I/O state, read on every request by the generic layer.
    lock: asyncio.Lock | None = None
    in_flight: int = 0
    tracked: set = attrs.Factory(set)
    serialising: int = 0
    drained: asyncio.Event | None = None
    write_gen: int = 0
    flushed_gen: int = 0
    flush_lock: asyncio.Lock = attrs.Factory(asyncio.Lock)
    detect_zeroes: str = "off"
    discard_unmap: bool = False
    no_flush: bool = False
    closed: bool = False
    log: Any = None
    dirty_bitmaps: list = attrs.Factory(list)  # blockgraph.bitmaps.DirtyBitmap, newest first

    def __repr__(self) -> str:
        return f"<Node {self.name!r} driver={self.driver_name}>"

    def describe(self) -> str:
        return f"node '{self.name}'"

    @property
    def driver_name(self) -> str:
        return type(self.driver).name

    @property
    def file(self) -> Child | None:
        return self.children.get("file")

    @property
    def backing(self) -> Child | None:
        return self.children.get("backing")

    @property
    def filtered(self) -> Child | None:
        """The child whose data this node shows unchanged (filters, raw without offset)."""
        for c in self.children.values():
            if c.role & ChildRole.FILTERED:
                return c
        return None

    def cow_child(self) -> Child | None:
        for c in self.children.values():
            if c.role & ChildRole.COW:
                return c
        return None

    def primary(self) -> Child | None:
        for c in self.children.values():
            if c.role & (ChildRole.PRIMARY | ChildRole.FILTERED):
                return c
        return None

    def set_limits(self, limits: BlockLimits) -> None:
        self.limits = limits

    def child_perm(self, child: Child, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        hook = getattr(self.driver, "child_perm", None)
        if hook is not None:
            want, share = hook(child.name, child.role, perm, shared)
        else:
            want, share = default_child_perm(child.role, perm, shared, writable=not self.read_only)
        if child.node.common is not None and child.node.common.force_share:
            share = Perm.ALL  # force-share: never keep anyone else out (bdrv_child_perm)
        return want, share

    def configure_io(self) -> None:
        """Cache what the generic layer reads per request."""
        drv_cls = type(self.driver)
        if self.kind is DriverKind.FILTER:
            _install_forwarding(self)
        self.caps = Capabilities.of(self.driver)
        if getattr(drv_cls, "concurrency", Concurrency.SERIALIZE_REQUESTS) is Concurrency.SERIALIZE_REQUESTS:
            self.lock = asyncio.Lock()
        if not self.caps.write:
            self.read_only = True


def _install_forwarding(node: Node) -> None:
    """Give a filter every data method it lacks, forwarded to its filtered child.

    Filters may not change data (that is what makes them a filter), so passing
    an operation through unchanged is always correct, including operations
    added to the API after the filter was written. Block status is recursed by
    the generic layer itself.
    """
    drv = node.driver

    def child() -> Child:
        c = node.filtered
        if c is None:
            raise OpenError(f"filter node '{node.name}' has no filtered child")
        return c

    async def preadv(offset: int, buf: memoryview, flags: ReqFlags) -> None:
        await child().preadv(offset, buf, flags)

    async def pwritev(offset: int, buf: memoryview, flags: ReqFlags) -> None:
        await child().pwritev(offset, buf, flags)

    async def pwrite_zeroes(offset: int, length: int, flags: ReqFlags) -> None:
        await child().pwrite_zeroes(offset, length, flags)

    async def pdiscard(offset: int, length: int) -> None:
        await child().pdiscard(offset, length)

    async def flush() -> None:
        """The generic layer flushes the child next."""

    async def truncate(length: int, exact: bool, prealloc: PreallocMode) -> None:
        await child().truncate(length, exact, prealloc)

    async def getlength() -> int:
        return child().node.length

    forwarders = {"preadv": preadv, "pwritev": pwritev, "pwrite_zeroes": pwrite_zeroes, "pdiscard": pdiscard,
                  "flush": flush, "truncate": truncate, "getlength": getlength}
    for name, fn in forwarders.items():
        if not callable(getattr(drv, name, None)):
            setattr(drv, name, fn)
    if not hasattr(type(drv), "supported_write_flags"):
        drv.supported_write_flags = ReqFlags.FUA  # the child emulates what it lacks
        drv.supported_zero_flags = ReqFlags.FUA | ReqFlags.MAY_UNMAP | ReqFlags.NO_FALLBACK


# ---------------------------------------------------------------- permission transactions


def _reachable(starts: Iterable[Node]) -> list[Node]:
    """Nodes below ``starts`` (inclusive) in topological order, parents first."""
    seen: set[int] = set()
    post: list[Node] = []

    def visit(n: Node) -> None:
        if id(n) in seen:
            return
        seen.add(id(n))
        for c in n.children.values():
            visit(c.node)
        post.append(n)

    for s in starts:
        visit(s)
    return post[::-1]


def _cumulative(edges: Iterable[Child], new: dict[Child, tuple[Perm, Perm]]) -> tuple[Perm, Perm]:
    perm, shared = Perm.NONE, Perm.ALL
    for e in edges:
        p, s = new.get(e, (e.perm, e.shared))
        perm |= p
        shared &= s
    return perm, shared


def _check_conflicts(node: Node, new: dict[Child, tuple[Perm, Perm]]) -> None:
    edges = node.parents
    for a in edges:
        want = new.get(a, (a.perm, a.shared))[0]
        for b in edges:
            if a is b:
                continue
            unshared = want & ~new.get(b, (b.perm, b.shared))[1] & Perm.ALL
            if unshared:
                raise PermissionConflict(
                    f"Permission conflict on node '{node.name}': permissions '{perm_names(unshared)}' are both "
                    f"required by {describe_user(a.parent)} (uses node '{node.name}' as '{a.name}' child) and "
                    f"unshared by {describe_user(b.parent)} (uses node '{node.name}' as '{b.name}' child).")


def update_perms(starts: Iterable[Node], edge_wants: dict[Child, tuple[Perm, Perm]] | None = None) -> None:
    """Recompute permissions below ``starts``; apply all of them or none.

    ``edge_wants`` gives new (perm, shared) for edges whose parent is not a
    node (block backends, jobs, exports). Protocol drivers with permission
    hooks (file locking) check first, and every check is rolled back if any
    node refuses.
    """
    new: dict[Child, tuple[Perm, Perm]] = dict(edge_wants or {})
    order = _reachable(starts)
    result: dict[Node, tuple[Perm, Perm]] = {}
    for n in order:
        _check_conflicts(n, new)
        perm, shared = _cumulative(n.parents, new)
        if n.read_only and perm & (Perm.WRITE | Perm.WRITE_UNCHANGED):
            users = [describe_user(c.parent) for c in n.parents
                     if new.get(c, (c.perm, c.shared))[0] & (Perm.WRITE | Perm.WRITE_UNCHANGED)]
            raise PermissionConflict(f"Block node '{n.name}' is read-only, but {', '.join(users)} wants to write")
        result[n] = (perm, shared)
        for c in n.children.values():
            new[c] = n.child_perm(c, perm, shared)
    checked: list[Node] = []
    try:
        for n in order:
            if n.caps and n.caps.perm_hooks and result[n] != (n.perm, n.shared):
                n.driver.check_perm(*result[n])
                checked.append(n)
    except BaseException:
        for n in checked:
            n.driver.abort_perm()
        raise
    for c, (p, s) in new.items():
        c.perm, c.shared = p, s
    for n in order:
        if n in checked:
            n.driver.set_perm(*result[n])
        n.perm, n.shared = result[n]


def attach(parent: Any, node: Node, name: str, role: ChildRole, *, perm: Perm | None = None,
           shared: Perm | None = None) -> Child:
    """Add an edge as a transaction: on a permission conflict nothing changes."""
    if isinstance(parent, Node) and name in parent.children:
        raise BlockGraphError(f"node '{parent.name}' already has a '{name}' child")
    child = Child(name, role, parent, node)
    node.parents.append(child)
    if isinstance(parent, Node):
        parent.children[name] = child
    wants = {} if perm is None else {child: (perm, Perm.ALL if shared is None else shared)}
    try:
        update_perms([node] if perm is not None else [parent], wants)
    except BaseException:
        node.parents.remove(child)
        if isinstance(parent, Node):
            del parent.children[name]
        raise
    node.refcnt += 1
    return child


def set_edge_perm(child: Child, perm: Perm, shared: Perm) -> None:
    """Change what a non-node parent (backend, job) takes and shares."""
    update_perms([child.node], {child: (perm, shared)})


async def detach(child: Child) -> None:
    """Remove an edge; a node whose last reference goes away is closed."""
    node = child.node
    if child in node.parents:
        node.parents.remove(child)
    if isinstance(child.parent, Node) and child.parent.children.get(child.name) is child:
        del child.parent.children[child.name]
    update_perms([node])
    await unref(node)


def replace(child: Child, new_node: Node) -> None:
    """Point ``child`` at ``new_node`` (insert a filter, pivot a job), or change nothing."""
    old = child.node
    old.parents.remove(child)
    child.node = new_node
    new_node.parents.append(child)
    try:
        update_perms([new_node, old])
    except BaseException:
        new_node.parents.remove(child)
        child.node = old
        old.parents.append(child)
        raise
    new_node.refcnt += 1
    old.refcnt -= 1


async def unref(node: Node) -> None:
    node.refcnt -= 1
    if node.refcnt <= 0 and not node.closed:
        await close_node(node)


async def close_node(node: Node) -> None:
    if node.closed:
        return
    await io.drain(node)
    if node.caps and node.caps.write and not node.read_only:
        try:
            await io.flush(node)
        except BlockIOError:
            pass
    node.closed = True
    try:
        await node.driver.close()
    finally:
        if node.caps and node.caps.perm_hooks and node.perm != Perm.NONE:
            node.driver.set_perm(Perm.NONE, Perm.ALL)
        node.session.forget_node(node)
        for c in list(node.children.values()):
            await detach(c)


class NodeContext:
    """The driver's only view of the kernel."""

    def __init__(self, node: Node, child_specs: dict[str, Any], opener: Callable[..., Any]) -> None:
        self._node = node
        self._specs = child_specs
        self._opener = opener

    @property
    def node_name(self) -> str:
        return self._node.name

    @property
    def log(self) -> Any:
        return self._node.log

    @property
    def graph_node(self) -> Node:
        """The node itself, for BlockStatus.file and the like."""
        return self._node

    @property
    def read_only(self) -> bool:
        return self._node.read_only

    @property
    def cache_direct(self) -> bool:
        return bool(self._node.common and self._node.common.cache_direct)

    @property
    def no_flush(self) -> bool:
        return self._node.no_flush

    @property
    def probed_raw(self) -> bool:
        return self._node.probed_raw

    @property
    def check_mode(self) -> bool:
        """Opened for ``img check`` (QEMU's BDRV_O_CHECK): skip what the check reads and repairs itself."""
        return self._node.check_mode

    @property
    def file(self) -> Child | None:
        return self._node.file

    @property
    def backing(self) -> Child | None:
        return self._node.backing

    @property
    def children(self) -> dict[str, Child]:
        return self._node.children

    def has_child_spec(self, name: str) -> bool:
        return name in self._specs

    async def open_child(self, name: str, role: ChildRole, *, required: bool = True,
                         default: Any = None) -> Child | None:
        """Open (or reference) the child given by option ``name`` (else ``default``) and attach it with ``role``."""
        spec = self._specs.pop(name, default)
        if spec is None:
            if required:
                raise OpenError(f"node '{self._node.name}': a '{name}' child is required "
                                f"(give {name}.driver=... or {name}=NODE-NAME)")
            return None
        child_node = await self._opener(spec, parent=self._node, role=role)
        try:
            return attach(self._node, child_node, name, role)
        except BaseException:
            if child_node.refcnt == 0:
                await close_node(child_node)
            raise

    def backing_disabled(self) -> bool:
        """True when the user gave ``backing=null``: open no backing file whatever the image says."""
        # An empty string is the keyval spelling of null (``backing=``), which QEMU still accepts.
        return "backing" in self._specs and self._specs["backing"] in (None, "")

    async def open_backing(self, filename: str | None, fmt: str | None = None) -> Child | None:
        """Attach the COW child: the ``backing`` option when given, else ``filename`` from the image header.

        A relative ``filename`` is resolved against the directory of this image (QEMU's path_combine), never
        the working directory; ``fmt=None`` probes. Returns None with ``backing=null`` or no backing file.
        """
        if "backing" in self._specs:
            if self.backing_disabled():
                del self._specs["backing"]
                return None
            return await self.open_child("backing", ChildRole.COW)
        if not filename:
            return None
        from .backing import backing_spec

        spec = self._specs["backing"] = await backing_spec(self._node, filename, fmt)
        try:
            return await self.open_child("backing", ChildRole.COW)
        except BaseException:
            probed = spec.get("file") if isinstance(spec, dict) else None
            if isinstance(probed, Node) and probed.refcnt == 0:
                await close_node(probed)
            raise

    def set_limits(self, **limits: int) -> None:
        self._node.limits = attrs.evolve(self._node.limits, **limits)

    def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._node.session.run_blocking(fn, *args)

    def best_format(self, header: bytes) -> str:
        """Which format probing would pick for this first-sector content."""
        return self._node.session.registry.probe(header, self._node.filename)

    async def block_status_of(self, child: Child, offset: int, length: int, want_zero: bool) -> BlockStatus:
        return await io.block_status(child.node, offset, length, want_zero)


__all__ = ["ENOTSUP", "Child", "Node", "NodeContext", "attach", "close_node", "detach", "replace", "update_perms"]
