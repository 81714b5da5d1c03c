"""A session: one plugin host, one graph, one thread pool, driven by one asyncio loop."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from typing import Any

import attrs

from . import io
from .driver import DriverKind
from .errors import BlockGraphError, OpenError, OptionError
from .log import get_logger
from .node import Node, NodeContext, _reachable, close_node, detach, update_perms
from .options import merge, one_of, opt, optional, parse_bool, parse_json, parse_str, structure
from .perms import ChildRole
from .plugins import PluginHost
from .pool import BlockingPool

PROBE_BYTES = 2048
_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
log = get_logger(__name__)

RAW_PROBE_WARNING = (
    "WARNING: Image format was not specified for '{0}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, "
    "write operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.")


@attrs.frozen(kw_only=True)
class NodeOptions:
    """Options every node takes, whatever its driver (QEMU's BlockdevOptionsBase)."""

    driver: str = opt(converter=parse_str)
    node_name: str | None = opt(None, key="node-name", converter=optional(parse_str))
    read_only: bool = opt(False, key="read-only", converter=parse_bool)
    auto_read_only: bool = opt(False, key="auto-read-only", converter=parse_bool)
    force_share: bool = opt(False, key="force-share", converter=parse_bool)
    cache_direct: bool = opt(False, key="cache.direct", converter=parse_bool)
    cache_no_flush: bool = opt(False, key="cache.no-flush", converter=parse_bool)
    discard: str = opt("ignore", converter=one_of("ignore", "off", "unmap", "on"))
    detect_zeroes: str = opt("off", key="detect-zeroes", converter=one_of("off", "on", "unmap"))


COMMON_KEYS = ("driver", "node-name", "read-only", "auto-read-only", "force-share", "cache", "discard",
               "detect-zeroes")
# What a child inherits from its parent unless set (QEMU's bdrv_inherited_options).
INHERITED = ("read-only", "auto-read-only", "force-share", "cache.direct", "cache.no-flush")


def _split_common(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    common = {k: v for k, v in options.items() if k in COMMON_KEYS}
    rest = {k: v for k, v in options.items() if k not in COMMON_KEYS}
    return common, rest


def _get(tree: dict[str, Any], dotted: str) -> Any:
    cur: Any = tree
    for frag in dotted.split("."):
        if not isinstance(cur, dict) or frag not in cur:
            return None
        cur = cur[frag]
    return cur


def _set_default(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    cur = tree
    for frag in path:
        cur = cur.setdefault(frag, {})
    cur.setdefault(last, value)


class Session:
    """Owns the graph. Create it, open nodes, and ``await close()`` when done."""

    def __init__(self, *, plugins: PluginHost | None = None, autoload: bool | None = None,
                 max_workers: int | None = None, warn: Callable[[str], None] | None = None) -> None:
        self.registry = plugins or PluginHost(autoload=autoload)
        self.nodes: dict[str, Node] = {}
        self.backends: dict[str, Any] = {}
        self._counter = 0
        self._pool = BlockingPool(max_workers or min(16, (os.cpu_count() or 2) * 4))
        self.warn = warn or (lambda msg: None)
        self.registry.pm.hook.blockgraph_configure.call_historic(kwargs={"session": self})

    # ------------------------------------------------------------ infrastructure

    def run_blocking(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run a blocking call on the bounded thread pool (aio=threads)."""
        return self._pool.run(fn, *args)

    def forget_node(self, node: Node) -> None:
        if self.nodes.get(node.name) is node:
            del self.nodes[node.name]
            self.registry.pm.hook.blockgraph_node_removed(node=node)

    def find_node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise BlockGraphError(f"Cannot find device='{name}' nor node-name='{name}'")  # bdrv_lookup_bs
        return node

    def _new_name(self) -> str:
        while True:
            self._counter += 1
            name = f"#block{self._counter:03d}"
            if name not in self.nodes:
                return name

    async def close(self) -> None:
        """Close every backend and node (flushing what was written), then the pool."""
        for blk in list(self.backends.values()):
            await blk.close()
        for node in sorted(self.nodes.values(), key=lambda n: len(n.parents)):
            if not node.parents:
                await close_node(node)
        # Users still attached (unnamed backends) hold the rest: close parents before their children, so a
        # format's cached metadata is written while its file is still open.
        for node in _reachable(list(self.nodes.values())):
            await close_node(node)
        self.registry.pm.hook.blockgraph_unconfigure(session=self)
        self._pool.shutdown()

    # ------------------------------------------------------------ opening nodes

    async def open_node(self, spec: Any, *, parent: Node | None = None,
                        role: ChildRole | None = None) -> Node:
        """Open a node from an option tree, or resolve a reference to an existing one."""
        if isinstance(spec, Node):
            return spec
        if isinstance(spec, str):
            return self.find_node(spec)
        if not isinstance(spec, dict):
            raise OptionError(f"expected an option object or a node name, got {spec!r}")
        options = dict(spec)
        probed_raw = bool(options.pop("x-probed-raw", False))
        # QEMU's BDRV_O_CHECK: set on the top node by ``img check``, inherited by every child (the backing too)
        check_mode = bool(options.pop("x-check", False)) or (parent is not None and parent.check_mode)
        if parent is not None and parent.common is not None:
            self._inherit(options, parent, role)
        if "driver" not in options and "filename" in options:
            options["driver"] = self.registry.protocol_for(str(options["filename"])) or "file"
        if "driver" not in options:
            raise OptionError("Parameter 'driver' is missing", node=options.get("node-name"))
        common_tree, rest = _split_common(options)
        name_given = common_tree.get("node-name")
        common = structure(NodeOptions, common_tree, node=name_given, driver=str(options["driver"]), kind="common")
        cls = self.registry.driver(common.driver)
        name = self._new_name() if common.node_name is None else common.node_name
        if common.node_name is not None:
            if not _NODE_NAME.match(name):
                raise OptionError(f"Invalid node-name: '{name}'", node=name, driver=common.driver,
                                  option="node-name")
            if name in self.backends:
                raise OptionError(f"node-name={name} is conflicting with a device id", node=name,
                                  option="node-name")
            if name in self.nodes:
                raise OptionError(f"Duplicate nodes with node-name='{name}'", node=name, option="node-name")
            if len(name) > 31:  # QEMU keeps node names in 32 bytes
                raise OptionError("Node name too long", node=name, option="node-name")
        if common.force_share and not common.read_only:
            raise OptionError("force-share=on can only be used with read-only images", node=name,
                              driver=common.driver, option="force-share")
        if common.detect_zeroes == "unmap" and common.discard not in ("unmap", "on"):
            raise OptionError("setting detect-zeroes to unmap is not allowed without setting discard "
                              "operation to unmap", node=name, driver=common.driver,
                              option="detect-zeroes")
        child_keys = set(getattr(cls, "child_options", ()))
        if "backing" not in child_keys and "backing" in rest and rest["backing"] is None:
            del rest["backing"]  # backing=null is taken by any driver in QEMU (BDRV_O_NO_BACKING)
        specs = {k: v for k, v in rest.items() if k in child_keys}
        driver_opts = structure(cls.Options, {k: v for k, v in rest.items() if k not in child_keys},
                                node=name, driver=common.driver, kind=DriverKind(cls.kind).value)
        node = Node(name=name, driver=cls(), session=self, kind=DriverKind(cls.kind),
                    read_only=common.read_only, generated_name=common.node_name is None,
                    options=driver_opts, common=common)
        node.log = log.bind(node_name=name, driver=common.driver)
        node.no_flush = common.cache_no_flush
        node.detect_zeroes = common.detect_zeroes
        node.discard_unmap = common.discard in ("unmap", "on")
        node.filename = str(_get(options, "filename") or _get(options, "file.filename") or "")
        node.probed_raw = probed_raw
        node.check_mode = check_mode
        node.configure_io()
        self.nodes[name] = node
        ctx = NodeContext(node, specs, self.open_node)
        try:
            await node.driver.open(ctx, driver_opts)
            if specs:
                key = next(iter(specs))
                raise OptionError(f"Invalid parameter '{key}'", node=name, driver=common.driver,
                                  option=key)
            node.length = io.sector_length(await node.driver.getlength())
        except BaseException as e:
            node.closed = True
            self.nodes.pop(name, None)
            for c in list(node.children.values()):
                await detach(c)
            if isinstance(e, OSError):
                raise OpenError(f"Could not open '{node.filename or name}': {e.strerror or e}") from None
            raise
        if node.file is not None and not node.filename:
            node.filename = node.file.node.filename
        node.log.debug("node_opened", length=node.length)
        self.registry.pm.hook.blockgraph_node_added(node=node)
        return node

    @staticmethod
    def _inherit(options: dict[str, Any], parent: Node, role: ChildRole | None) -> None:
        c = parent.common
        values = {"read-only": c.read_only, "auto-read-only": c.auto_read_only, "force-share": c.force_share,
                  "cache.direct": c.cache_direct, "cache.no-flush": c.cache_no_flush}
        if role is not None and role & ChildRole.COW:
            values["read-only"] = True
        tree = options
        for key in INHERITED:
            if _get(tree, key) is None:
                _set_default(tree, key, values[key])
        # Format drivers send flushes and respect unmap policy themselves, so lower layers may unmap.
        options.setdefault("discard", "unmap")

    # ------------------------------------------------------------ images by filename

    async def open_image(self, filename: str, *, fmt: str | None = None, options: dict[str, Any] | None = None,
                         read_only: bool = False, force_share: bool = False, cache_direct: bool | None = None,
                         no_flush: bool | None = None, discard: str | None = None) -> Node:
        """Open ``filename`` as qemu-img does: protocol from the prefix, format given or probed."""
        options = dict(options or {})
        base: dict[str, Any] = {"read-only": read_only}
        if force_share:
            base["force-share"] = True
        if cache_direct is not None:
            base["cache"] = {"direct": cache_direct, "no-flush": bool(no_flush)}
        elif no_flush:
            base["cache"] = {"no-flush": True}
        if discard is not None:
            base["discard"] = discard
        if filename.startswith("json:"):
            tree = merge(parse_json(filename[5:], "json: filename"), options)
            tree = merge(base, tree)
            if fmt is not None:
                tree.setdefault("driver", fmt)
            if "driver" in tree:
                return await self.open_node(tree)
            file_spec = tree.pop("file", None)
            if file_spec is None and "filename" in tree:
                file_spec = {"filename": tree.pop("filename")}
            if file_spec is None:
                raise OptionError("json: filename must give a driver or a file")
            return await self._probe_and_open(filename, tree, file_spec)
        proto = self.registry.protocol_for(filename) or "file"
        proto_cls = self.registry.driver(proto)
        parse = getattr(proto_cls, "parse_filename", None)
        proto_opts = parse(filename) if parse else {"filename": filename}
        file_spec = merge({"driver": proto, **proto_opts}, options.pop("file", {}) or {})
        tree = merge(base, options)
        if fmt is not None and self.registry.driver_entry(fmt).meta["kind"] is DriverKind.PROTOCOL:
            return await self.open_node(merge(tree, merge(file_spec, {"driver": fmt})))
        if fmt is not None:
            return await self.open_node({**tree, "driver": fmt, "file": file_spec})
        return await self._probe_and_open(filename, tree, file_spec)

    async def _probe_and_open(self, filename: str, tree: dict[str, Any], file_spec: Any) -> Node:
        inherit = {k: tree[k] for k in ("read-only", "force-share", "cache") if k in tree}
        if isinstance(file_spec, dict):
            file_spec = merge(inherit, file_spec)
            file_spec.setdefault("discard", "unmap")
        proto_node = await self.open_node(file_spec)
        try:
            n = min(PROBE_BYTES, proto_node.length)
            header = bytearray(n)
            await io.preadv(proto_node, 0, memoryview(header))
            fmt = self.registry.probe(bytes(header), filename)
            if fmt == "raw" and not tree.get("read-only"):
                self.warn(RAW_PROBE_WARNING.format(filename))
            return await self.open_node({**tree, "driver": fmt, "file": proto_node,
                                         "x-probed-raw": fmt == "raw"})
        finally:
            if proto_node.refcnt == 0:
                await close_node(proto_node)

    # ------------------------------------------------------------ backends

    async def open_backend(self, filename: str, *, fmt: str | None = None, read_only: bool = False,
                           force_share: bool = False, share_all: bool = False, name: str | None = None,
                           write_cache: bool = True, **kw: Any) -> Any:
        """Open an image and attach a BlockBackend to it, as qemu-img and qemu-io do (``blk_new_open``)."""
        from .backend import BlockBackend

        node = await self.open_image(filename, fmt=fmt, read_only=read_only, force_share=force_share, **kw)
        try:
            return await BlockBackend.attach_new(self, node, name=name, read_only=read_only,
                                                 share_all=force_share or share_all, write_cache=write_cache)
        except BaseException:
            await close_node(node)
            raise

    async def reopen(self, node: Node, *, read_only: bool | None = None,
                     options: dict[str, Any] | None = None) -> None:
        """Change a live node's read-only flag and mutable options, all or nothing (blockdev-reopen)."""
        from .reopen import reopen

        await reopen(node, read_only=read_only, options=options)

    def refresh_perms(self, node: Node) -> None:
        update_perms([node])
