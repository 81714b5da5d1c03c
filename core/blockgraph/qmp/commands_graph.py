"""Changing the graph: blockdev-add, blockdev-del, blockdev-reopen, block_resize, block_set_io_throttle."""

from __future__ import annotations

from typing import Any

from .. import io
from ..driver import PreallocMode
from ..options import parse_bool
from ..session import COMMON_KEYS
from .commands_query import THROTTLE_FIELDS
from .protocol import DeviceNotFound, QMPError
from .registry import command

THROTTLE_MAX = 1_000_000_000_000_000  # QEMU's THROTTLE_VALUE_MAX


@command("blockdev-add")
async def blockdev_add(daemon: Any, args: dict[str, Any]) -> None:
    await daemon.add_blockdev(args)


@command("blockdev-del", {"node-name": "str"})
async def blockdev_del(daemon: Any, args: dict[str, Any]) -> None:
    await daemon.delete_blockdev(args["node-name"])


@command("blockdev-reopen", {"options": "list"})
async def blockdev_reopen(daemon: Any, args: dict[str, Any]) -> None:
    """Each entry names a node and gives its options anew; children are given by reference and may
    change (``file`` / ``backing`` to another node, ``backing: null`` to drop it). Every entry is checked
    before any is applied."""
    plans = [_reopen_plan(daemon, i, opts) for i, opts in enumerate(args["options"])]
    for node, read_only, rest, children in plans:
        for role, target in children.items():
            await _change_child(node, role, target)
        await daemon.session.reopen(node, read_only=read_only, options=rest or None)


def _reopen_plan(daemon: Any, i: int, opts: Any) -> tuple[Any, bool, dict[str, Any], dict[str, Any]]:
    if not isinstance(opts, dict):
        raise QMPError(f"Invalid parameter type for 'options[{i}]', expected: object")
    if "driver" not in opts:
        raise QMPError(f"Parameter 'options[{i}].driver' is missing")
    name = opts.get("node-name")
    if name is None:
        raise QMPError("node-name not specified")
    node = daemon.session.nodes.get(name)
    if node is None:
        raise QMPError(f"Failed to find node with node-name='{name}'")
    if opts["driver"] != node.driver_name:
        raise QMPError("Cannot change the option 'driver'")
    children: dict[str, Any] = {}
    for role in ("file", "backing"):
        if role not in opts:
            continue
        ref, current = opts[role], node.children.get(role)
        if ref is None:
            if current is not None:
                children[role] = None
            continue
        if not isinstance(ref, str):
            raise QMPError(f"Cannot change the option '{role}': give the new child by node-name")
        target = daemon.session.nodes.get(ref)
        if target is None:
            raise QMPError(f"Cannot find device='{ref}' nor node-name='{ref}'")
        if target is node:
            raise QMPError(f"Making '{ref}' a {role} child of '{name}' would create a cycle")
        if current is None or current.node is not target:
            if current is None and role == "file":
                raise QMPError("Cannot change the option 'file'")
            children[role] = target
    rest = {k: v for k, v in opts.items() if k not in COMMON_KEYS and k not in ("file", "backing")}
    try:
        read_only = parse_bool(opts.get("read-only", False))
    except ValueError:
        raise QMPError(f"Invalid parameter type for 'options[{i}].read-only', expected: boolean") from None
    return node, read_only, rest, children


async def _change_child(node: Any, role: str, target: Any) -> None:
    """Point ``node``'s ``role`` edge at ``target`` (the Child object stays, so drivers keep it), or drop it."""
    from ..backing import backing_changed
    from ..node import detach, replace

    edge = node.children.get(role)
    async with io.drained(node):
        if target is None:
            await detach(edge)
            if role == "backing":
                backing_changed(node, None)
        elif edge is None:
            from ..node import attach
            from ..perms import ChildRole

            new = attach(node, target, role, ChildRole.COW)
            if role == "backing":
                backing_changed(node, new)
        else:
            replace(edge, target)


@command("block_resize", {"*device": "str", "*node-name": "str", "size": "int"})
async def block_resize(daemon: Any, args: dict[str, Any]) -> None:
    from ..backend import BlockBackend

    node = daemon.lookup(args.get("device"), args.get("node-name"))
    size = args["size"]
    if size < 0:
        raise QMPError("Parameter 'size' expects a >0 size")
    if node.read_only:
        raise QMPError("Block node is read-only")
    blk = daemon.session.backends.get(args.get("device"))
    if blk is not None and not blk.read_only:
        await blk.truncate(size, exact=False)  # the backend takes the resize permission on its own edge
        return
    # Only the resize permission, shared with everyone, as QEMU's block_resize takes it.
    blk = BlockBackend(daemon.session, read_only=True, share_all=True, resize=True)
    blk.insert(node)
    try:
        async with io.drained(node):
            await io.truncate(node, size, False, PreallocMode.OFF)
    finally:
        await blk.close()


_THROTTLE_ARGS = {"*device": "str", "*id": "str", **{f: "int" for f in THROTTLE_FIELDS},
                  **{f"*{f}_max": "int" for f in THROTTLE_FIELDS},
                  **{f"*{f}_max_length": "int" for f in THROTTLE_FIELDS}, "*iops_size": "int", "*group": "str"}


@command("block_set_io_throttle", _THROTTLE_ARGS)
def block_set_io_throttle(daemon: Any, args: dict[str, Any]) -> None:
    """Store the limits on the backend; they show in query-block. Enforcing them needs the throttle
    filter (blockgraph-throttle), which does not exist yet."""
    if ("device" in args) == ("id" in args):
        raise QMPError("Need exactly one of 'device' and 'id'")
    name = args.get("device", args.get("id"))
    blk = daemon.session.backends.get(name)
    if blk is None:
        raise DeviceNotFound(f"Device '{name}' not found")
    if blk.root is None:
        raise QMPError(f"Device '{name}' has no medium")
    limits = {k: v for k, v in args.items() if k not in ("device", "id")}
    for key, value in limits.items():
        if key != "group" and not 0 <= value <= THROTTLE_MAX:
            raise QMPError(f"bps/iops/max values must be within [0, {THROTTLE_MAX}]")
    for kind in ("bps", "iops"):
        if limits.get(kind) and (limits.get(f"{kind}_rd") or limits.get(f"{kind}_wr")):
            raise QMPError(f"{kind} and {kind}_rd/{kind}_wr cannot be used at the same time")
    if not any(limits.get(k) for k in THROTTLE_FIELDS):
        daemon.throttle.pop(name, None)
        return
    limits.setdefault("group", name)
    daemon.throttle[name] = limits
