"""Exports, generic over their type: block-export-add / -del and query-block-exports dispatch to the
export types plugins register (``blockgraph_register_exports``)."""

from __future__ import annotations

from typing import Any

from .protocol import QMPError
from .registry import command


@command("block-export-add")
async def block_export_add(daemon: Any, args: dict[str, Any]) -> None:
    await daemon.add_export(dict(args))


@command("block-export-del", {"id": "str", "*mode": "str"})
async def block_export_del(daemon: Any, args: dict[str, Any]) -> None:
    mode = args.get("mode", "safe")
    if mode not in ("safe", "hard"):
        raise QMPError(f"Parameter 'mode' does not accept value '{mode}'")
    await daemon.delete_export(args["id"], mode)


@command("query-block-exports", {})
def query_block_exports(daemon: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
    # Newest first: QEMU inserts each export at the head of its list.
    return [{"id": export_id, "type": getattr(export, "type", "?"), "node-name": getattr(export, "node_name", ""),
             "shutting-down": bool(getattr(export, "shutting_down", False))}
            for export_id, export in reversed(daemon.exports.items())]
