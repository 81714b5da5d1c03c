"""Monitor housekeeping: version, command list, quit, and the object table."""

from __future__ import annotations

from typing import Any

from .protocol import QMPError, version
from .registry import command


@command("qmp_capabilities", {"*enable": "list"}, builtin=True)
def qmp_capabilities(daemon: Any, args: dict[str, Any]) -> None:
    """Answered by the client's connection (it holds the negotiation state); listed here."""


@command("query-version", {})
def query_version(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    return version()


@command("query-commands", {})
def query_commands(daemon: Any, args: dict[str, Any]) -> list[dict[str, str]]:
    return [{"name": name} for name in sorted(daemon.qmp.commands)]


@command("quit", {})
def quit_(daemon: Any, args: dict[str, Any]) -> None:
    daemon.request_shutdown("host-qmp-quit")


@command("object-add")
def object_add(daemon: Any, args: dict[str, Any]) -> None:
    daemon.add_object(dict(args))


@command("object-del", {"id": "str"})
def object_del(daemon: Any, args: dict[str, Any]) -> None:
    daemon.delete_object(args["id"])


@command("qom-list", {"path": "str"})
def qom_list(daemon: Any, args: dict[str, Any]) -> list[dict[str, str]]:
    """Only ``/objects`` exists here: what --object and object-add created."""
    if args["path"].rstrip("/") != "/objects":
        raise QMPError(f"Device '{args['path']}' not found", "DeviceNotFound")
    return [{"name": "type", "type": "string"}] + [
        {"name": obj_id, "type": f"child<{rec['qom-type']}>"} for obj_id, rec in sorted(daemon.objects.items())]


@command("cont", {})
def cont(daemon: Any, args: dict[str, Any]) -> None:
    """Retry the requests that a ``stop`` error policy holds, on every backend (QEMU's ``cont``)."""
    for blk in daemon.session.backends.values():
        if blk.iostatus != "ok":
            blk.resume()
