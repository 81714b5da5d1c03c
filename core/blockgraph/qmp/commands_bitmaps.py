"""block-dirty-bitmap-add/remove/clear/enable/disable/merge with QEMU's arguments and error texts."""

from __future__ import annotations

from typing import Any

from .. import bitmaps
from ..bitmaps import BitmapError, DirtyBitmap
from ..node import Node
from .protocol import QMPError
from .registry import command

_NODE_NAME = {"node": "str", "name": "str"}


def _node(daemon: Any, name: str) -> Node:
    """The node by node-name or device name, "Node '...' not found" otherwise (block_dirty_bitmap_lookup)."""
    blk = daemon.session.backends.get(name)
    if blk is not None and blk.root is not None:
        return blk.node
    node = daemon.session.nodes.get(name)
    if node is None:
        raise QMPError(f"Node '{name}' not found")
    return node


def lookup(daemon: Any, node_name: str, name: str) -> tuple[Node, DirtyBitmap]:
    node = _node(daemon, node_name)
    bm = bitmaps.find(node, name)
    if bm is None:
        raise QMPError(f"Dirty bitmap '{name}' not found")
    return node, bm


def _check(bm: DirtyBitmap, *, allow_ro: bool = False) -> None:
    try:
        bm.check(allow_ro=allow_ro)
    except BitmapError as e:
        raise QMPError(e.reason) from e  # the cause keeps QEMU's hint, which qemu-img prints


@command("block-dirty-bitmap-add", {"node": "str", "name": "str", "*granularity": "int", "*persistent": "bool",
                                    "*disabled": "bool"})
def dirty_bitmap_add(daemon: Any, args: dict[str, Any]) -> None:
    name = args["name"]
    if not name:
        raise QMPError("Bitmap name cannot be empty")
    try:
        node = daemon.lookup(args["node"], args["node"])
    except QMPError:
        raise QMPError(f"Cannot find device='{args['node']}' nor node-name='{args['node']}'") from None
    granularity = args.get("granularity")
    if granularity is not None:
        if not 0 <= granularity < 1 << 32:
            raise QMPError("Parameter 'granularity' expects uint32_t")
        if granularity < 512 or granularity & (granularity - 1):
            raise QMPError("Granularity must be power of 2 and at least 512")
    persistent = args.get("persistent", False)
    try:
        if persistent:
            # A format that stores bitmaps says whether this one fits (bdrv_can_store_new_dirty_bitmap).
            can_store = getattr(node.driver, "can_store_new_dirty_bitmap", None)
            if can_store is None:
                raise QMPError(f"Can't store persistent bitmaps to {node.name}: Operation not supported")
            can_store(name, granularity or bitmaps.default_granularity(node))
        bitmaps.create(node, name, granularity, enabled=not args.get("disabled", False), persistent=persistent)
    except BitmapError as e:
        raise QMPError(e.reason) from None


@command("block-dirty-bitmap-remove", _NODE_NAME)
def dirty_bitmap_remove(daemon: Any, args: dict[str, Any]) -> None:
    node, bm = lookup(daemon, args["node"], args["name"])
    if bm.busy or bm.readonly:  # an inconsistent bitmap may be removed
        _check(bm)
    bitmaps.remove(node, bm)


@command("block-dirty-bitmap-clear", _NODE_NAME)
def dirty_bitmap_clear(daemon: Any, args: dict[str, Any]) -> None:
    _, bm = lookup(daemon, args["node"], args["name"])
    _check(bm)
    bm.clear()


@command("block-dirty-bitmap-enable", _NODE_NAME)
def dirty_bitmap_enable(daemon: Any, args: dict[str, Any]) -> None:
    _, bm = lookup(daemon, args["node"], args["name"])
    _check(bm, allow_ro=True)
    bm.enabled = True


@command("block-dirty-bitmap-disable", _NODE_NAME)
def dirty_bitmap_disable(daemon: Any, args: dict[str, Any]) -> None:
    _, bm = lookup(daemon, args["node"], args["name"])
    _check(bm, allow_ro=True)
    bm.enabled = False


@command("block-dirty-bitmap-merge", {"node": "str", "target": "str", "bitmaps": "list"})
def dirty_bitmap_merge(daemon: Any, args: dict[str, Any]) -> None:
    node, target = lookup(daemon, args["node"], args["target"])
    _check(target)
    sources: list[DirtyBitmap] = []
    for ref in args["bitmaps"]:
        if isinstance(ref, str):
            src_node, name = node, ref
        elif isinstance(ref, dict) and isinstance(ref.get("node"), str) and isinstance(ref.get("name"), str):
            src_node, name = _node(daemon, ref["node"]), ref["name"]
        else:
            raise QMPError("Invalid parameter type for 'bitmaps', expected: array of BlockDirtyBitmapOrStr")
        src = bitmaps.find(src_node, name)
        if src is None:
            raise QMPError(f"Dirty bitmap '{name}' not found")
        _check(src, allow_ro=True)
        if src.size != target.size:
            raise QMPError(f"Bitmaps are of different sizes (destination size is {target.size}, source size is "
                           f"{src.size}) and can't be merged")
        sources.append(src)
    for src in sources:
        target.merge(src)
