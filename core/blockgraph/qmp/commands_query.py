"""What the graph looks like: query-named-block-nodes, query-block, query-blockstats, the graph dump.

Result shapes are QAPI's BlockDeviceInfo, BlockInfo, BlockStats and XDbgBlockGraph.
"""

from __future__ import annotations

from typing import Any

from ..node import Node
from ..perms import Perm
from .registry import command

THROTTLE_FIELDS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")
THROTTLE_OPTIONAL = tuple(f"{f}_max" for f in THROTTLE_FIELDS) + tuple(f"{f}_max_length" for f in THROTTLE_FIELDS) \
    + ("iops_size", "group")
# QAPI's BlockPermission names, in QEMU's bit order.
PERM_QAPI = ((Perm.CONSISTENT_READ, "consistent-read"), (Perm.WRITE, "write"),
             (Perm.WRITE_UNCHANGED, "write-unchanged"), (Perm.RESIZE, "resize"))


# QEMU's strong_runtime_opts: options that change what a node shows, so its name must carry them. Used
# for drivers whose options do not say so themselves (``opt(..., strong=True)``).
STRONG_OPTIONS = {"null-co": ("size", "read-zeroes"), "null-aio": ("size", "read-zeroes"),
                  "raw": ("offset", "size")}


def _strong(node: Node) -> dict[str, Any]:
    import attrs

    from ..options import option_fields

    if node.options is None or not attrs.has(type(node.options)):
        return {}
    fields = option_fields(type(node.options))
    named = STRONG_OPTIONS.get(node.driver_name, ())
    out = {}
    for key, field in fields.items():
        if field.metadata.get("strong") or key in named:
            value = getattr(node.options, field.name)
            if value is not None and value != field.default:
                out[key] = value
    return out


def _needs_json(node: Node, depth: int = 0) -> bool:
    if _strong(node):
        return True
    return depth < 64 and any(_needs_json(c.node, depth + 1) for n, c in node.children.items() if n != "backing")


def _full_options(node: Node) -> dict[str, Any]:
    opts: dict[str, Any] = {"driver": node.driver_name, **_strong(node)}
    if not node.children and node.filename:
        opts["filename"] = node.filename
    for name, child in node.children.items():
        if name != "backing":
            opts[name] = _full_options(child.node)
    return opts


def node_filename(node: Node) -> str:
    """bs->filename: the plain file name, or ``json:{...}`` when options the name cannot show are set."""
    if _needs_json(node):
        from ..cli.img_qjson import dumps

        return "json:" + dumps(_full_options(node), pretty=False)
    return node.filename or f"{node.driver_name}://"


def backing_depth(node: Node) -> int:
    depth, cur = 0, node.cow_child()
    while cur is not None and depth < 1024:
        depth += 1
        cur = cur.node.cow_child()
    return depth


async def image_info(node: Node, flat: bool) -> dict[str, Any]:
    from ..cli.img_info import image_info as img_image_info

    info = await img_image_info(node, node_filename(node))
    cow = node.cow_child()
    if cow is not None and not flat:
        info["backing-image"] = await image_info(cow.node, flat)
    return info


async def device_info(daemon: Any, node: Node, *, flat: bool = False, backend: Any = None) -> dict[str, Any]:
    """BlockDeviceInfo of ``node`` (the ``inserted`` member of query-block when ``backend`` is given)."""
    common = node.common
    info: dict[str, Any] = {"file": node_filename(node), "node-name": node.name, "ro": node.read_only,
                            "drv": node.driver_name}
    cow = node.cow_child()
    if cow is not None:
        info["backing_file"] = node_filename(cow.node)
    info["backing_file_depth"] = backing_depth(node)
    info["encrypted"] = False
    info["detect_zeroes"] = node.detect_zeroes
    limits = daemon.throttle.get(backend.name, {}) if backend is not None and backend.name else {}
    for key in THROTTLE_FIELDS:
        info[key] = int(limits.get(key, 0))
    for key in THROTTLE_OPTIONAL:
        if limits.get(key):
            info[key] = limits[key]
    info["image"] = await image_info(node, flat)
    info["cache"] = {"writeback": backend.write_cache if backend is not None else True,
                     "direct": bool(common and common.cache_direct), "no-flush": node.no_flush}
    info["write_threshold"] = 0
    if node.dirty_bitmaps:
        info["dirty-bitmaps"] = [bm.info() for bm in node.dirty_bitmaps]
    return info


@command("query-named-block-nodes", {"*flat": "bool"})
async def query_named_block_nodes(daemon: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
    flat = args.get("flat", False)
    # Newest first, as QEMU lists its node list.
    return [await device_info(daemon, node, flat=flat) for node in reversed(list(daemon.session.nodes.values()))]


@command("query-block", {})
async def query_block(daemon: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, blk in daemon.session.backends.items():
        info: dict[str, Any] = {"device": name, "locked": False, "removable": True}
        if blk.root is not None:
            info["inserted"] = await device_info(daemon, blk.node, backend=blk)
        info["type"] = "unknown"
        if blk.iostatus != "ok" or blk.werror != "enospc" or blk.rerror != "report":
            info["io-status"] = blk.iostatus
        out.append(info)
    return out


STAT_KEYS = ("rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations", "unmap_operations",
             "flush_operations", "rd_total_time_ns", "wr_total_time_ns", "unmap_total_time_ns",
             "flush_total_time_ns", "wr_highest_offset", "rd_merged", "wr_merged", "unmap_merged",
             "failed_rd_operations", "failed_wr_operations", "failed_unmap_operations", "failed_flush_operations",
             "invalid_rd_operations", "invalid_wr_operations", "invalid_unmap_operations",
             "invalid_flush_operations")


def _stats(counters: dict[str, int] | None) -> dict[str, Any]:
    stats: dict[str, Any] = {k: int((counters or {}).get(k, 0)) for k in STAT_KEYS}
    stats.update({"account_invalid": counters is not None, "account_failed": counters is not None,
                  "timed_stats": []})
    return stats


def _node_stats(node: Node) -> dict[str, Any]:
    out: dict[str, Any] = {"node-name": node.name, "stats": _stats(None)}
    if node.driver_name in ("file", "host_device", "host_cdrom"):  # BlockStatsSpecificFile
        out["driver-specific"] = {"driver": node.driver_name, "discard-nb-ok": 0, "discard-nb-failed": 0,
                                  "discard-bytes-ok": 0}
    if node.file is not None:
        out["parent"] = _node_stats(node.file.node)
    cow = node.cow_child()
    if cow is not None:
        out["backing"] = _node_stats(cow.node)
    return out


@command("query-blockstats", {"*query-nodes": "bool"})
def query_blockstats(daemon: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
    if args.get("query-nodes"):
        return [_node_stats(node) for node in daemon.session.nodes.values()]
    out = []
    for name, blk in daemon.session.backends.items():
        entry: dict[str, Any] = {"device": name}
        if blk.root is not None:
            entry.update(_node_stats(blk.node))
        entry["stats"] = _stats(blk.stats)
        out.append(entry)
    return out


def _perm_list(perm: int) -> list[str]:
    return [name for bit, name in reversed(PERM_QAPI) if perm & bit]


@command("x-debug-query-block-graph", {})
def query_block_graph(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    ids: dict[int, int] = {}
    nodes: list[dict[str, Any]] = []

    def add(obj: Any, typ: str, name: str) -> None:
        if id(obj) not in ids:
            ids[id(obj)] = len(ids) + 1
            nodes.append({"id": ids[id(obj)], "type": typ, "name": name})

    for name, blk in daemon.session.backends.items():
        add(blk, "block-backend", name)
    for export_id, export in daemon.exports.items():
        add(export, "block-export", export_id)
        blk = getattr(export, "blk", None)
        if blk is not None:  # the export's own backend is the export in QEMU's graph
            ids[id(blk)] = ids[id(export)]
    for node in daemon.session.nodes.values():
        add(node, "block-driver", node.name)
    edges = []
    for node in daemon.session.nodes.values():
        for child in node.parents:
            parent = child.parent
            if id(parent) not in ids:
                add(parent, "block-backend", getattr(parent, "name", None) or "")
            edges.append({"parent": ids[id(parent)], "child": ids[id(node)], "name": child.name,
                          "perm": _perm_list(child.perm), "shared-perm": _perm_list(child.shared)})
    return {"nodes": nodes, "edges": edges}
