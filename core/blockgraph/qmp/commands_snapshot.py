"""External snapshots (a new overlay on top of a live node) and internal ones (through the format's
snapshot hooks: ``snapshot_create`` / ``snapshot_delete`` / ``snapshot_list``)."""

from __future__ import annotations

import os
import time
from typing import Any

from .. import io
from ..backing import backing_changed
from ..errors import BlockGraphError
from ..node import Node, attach, replace
from ..perms import ChildRole
from .protocol import QMPError, from_exception
from .registry import command


async def append(overlay: Node, old: Node, *, attach_backing: bool) -> None:
    """Put ``overlay`` where ``old`` was: every parent of ``old`` now uses ``overlay`` (bdrv_append)."""
    async with io.drained(old):
        backing_edge = overlay.children.get("backing") if not attach_backing else None
        moved = []
        try:
            if attach_backing:
                backing_edge = attach(overlay, old, "backing", ChildRole.COW)
                backing_changed(overlay, backing_edge)
            for edge in [c for c in old.parents if c is not backing_edge]:
                replace(edge, overlay)
                moved.append(edge)
        except BaseException:
            for edge in moved:
                replace(edge, old)
            raise


@command("blockdev-snapshot-sync", {"*device": "str", "*node-name": "str", "snapshot-file": "str",
                                    "*snapshot-node-name": "str", "*format": "str", "*mode": "str"})
async def blockdev_snapshot_sync(daemon: Any, args: dict[str, Any]) -> None:
    session = daemon.session
    old = daemon.lookup(args.get("device"), args.get("node-name"))
    new_name = args.get("snapshot-node-name")
    fmt = args.get("format", "qcow2")
    mode = args.get("mode", "absolute-paths")
    path = args["snapshot-file"]
    if args.get("node-name") is not None and new_name is None:
        raise QMPError("New overlay node-name missing")
    if mode not in ("existing", "absolute-paths"):
        raise QMPError(f"Parameter 'mode' does not accept value '{mode}'")
    if new_name is not None and (new_name in session.nodes or new_name in session.backends):
        raise QMPError("New overlay node-name already in use")
    fmt_cls = session.registry.driver(fmt)
    if mode == "absolute-paths":
        if not callable(getattr(fmt_cls, "create", None)):
            raise QMPError(f"Format driver '{fmt}' does not support image creation")
        await _create_overlay(session, path, fmt, old)
    elif not os.path.exists(path):
        raise QMPError(f"Could not open '{path}': No such file or directory")
    tree: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": path}, "backing": old.name,
                            "read-only": old.read_only}
    if old.common is not None:  # the overlay is opened with the old top's cache flags, as QEMU does
        tree["cache"] = {"direct": old.common.cache_direct, "no-flush": old.common.cache_no_flush}
    if new_name is not None:
        tree["node-name"] = new_name
    overlay = await session.open_node(tree)
    try:
        await append(overlay, old, attach_backing=False)
    except BaseException:
        from ..node import close_node

        await close_node(overlay)
        raise
    # The overlay stays when nothing used the old node (QEMU would drop it): the monitor owns it.
    overlay.refcnt += 1
    daemon.monitor_owned.add(overlay.name)


async def _create_overlay(session: Any, path: str, fmt: str, old: Node) -> None:
    from ..cli.img_create import img_create

    try:
        await img_create(session, path, fmt, None, old.length, backing=old.filename, backing_fmt=old.driver_name,
                         unsafe=True, quiet=True)
    except BlockGraphError as e:
        raise from_exception(e) from None
    except Exception as e:  # ImgExit carries qemu-img's "file: reason" line
        raise QMPError(str(e)) from None


@command("blockdev-snapshot", {"node": "str", "overlay": "str"})
async def blockdev_snapshot(daemon: Any, args: dict[str, Any]) -> None:
    old = daemon.lookup(args["node"], args["node"])
    overlay = daemon.lookup(args["overlay"], args["overlay"])
    if overlay is old:
        raise QMPError(f"Making '{args['node']}' a backing child of '{args['overlay']}' would create a cycle")
    if overlay.parents:
        raise QMPError("The overlay is already in use")
    if overlay.cow_child() is not None:
        raise QMPError("The overlay already has a backing image")
    cls = type(overlay.driver)
    if overlay.kind.value != "format" or not (getattr(cls, "supports_backing", False)
                                              or "backing" in getattr(cls, "child_options", ())):
        raise QMPError("The overlay does not support backing images")
    await append(overlay, old, attach_backing=True)


# ---------------------------------------------------------------- internal snapshots


def _snapshot_node(daemon: Any, device: str) -> Node:
    node = daemon.lookup(device, device)
    cur = node
    while cur is not None and cur.kind.value == "filter":  # filters pass snapshots through
        child = cur.filtered
        cur = child.node if child is not None else None
    if cur is None or not cur.caps.snapshot:
        drv = cur.driver_name if cur is not None else node.driver_name
        raise QMPError(f"Block format '{drv}' used by device '{device}' does not support internal snapshots")
    return cur


def _to_qapi(sn: Any) -> dict[str, Any]:
    out = {"id": sn.id, "name": sn.name, "vm-state-size": sn.vm_state_size, "date-sec": sn.date_sec,
           "date-nsec": sn.date_nsec, "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
           "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000}
    if sn.icount is not None:
        out["icount"] = sn.icount
    return out


@command("blockdev-snapshot-internal-sync", {"device": "str", "name": "str"})
async def blockdev_snapshot_internal_sync(daemon: Any, args: dict[str, Any]) -> None:
    from ..driver import SnapshotInfo

    device, name = args["device"], args["name"]
    node = _snapshot_node(daemon, device)
    if not name:
        raise QMPError("Name is empty")
    if node.read_only:
        raise QMPError(f"Device '{device}' is read only")
    if any(sn.name == name for sn in await node.driver.snapshot_list()):
        raise QMPError(f"Snapshot with name '{name}' already exists on device '{device}'")
    now = time.time_ns()
    sn = SnapshotInfo(name=name, date_sec=now // 1_000_000_000, date_nsec=now % 1_000_000_000)
    async with io.drained(node):
        await io.flush(node)
        await node.driver.snapshot_create(sn)


@command("blockdev-snapshot-delete-internal-sync", {"device": "str", "*id": "str", "*name": "str"})
async def blockdev_snapshot_delete_internal_sync(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    device, sn_id, name = args["device"], args.get("id"), args.get("name")
    node = _snapshot_node(daemon, device)
    if sn_id is None and name is None:
        raise QMPError("Name or id must be provided")
    if node.read_only:
        raise QMPError(f"Device '{device}' is read only")
    for sn in await node.driver.snapshot_list():
        if (sn_id is None or sn.id == sn_id) and (name is None or sn.name == name):
            break
    else:
        raise QMPError(f"Snapshot with id '{sn_id or 'null'}' and name '{name or 'null'}' does not exist on device "
                       f"'{device}'")
    async with io.drained(node):
        await node.driver.snapshot_delete(sn.id, sn.name)
    return _to_qapi(sn)
