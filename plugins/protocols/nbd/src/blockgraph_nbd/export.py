"""The ``nbd`` export type and the ``nbd-server-*`` QMP commands, for ``blockgraph serve``.

The shapes are those of ``blockgraph.hookspecs``: the export type has
``create(daemon, options)``, ``start_server(daemon, options)`` and
``stop_server(daemon)``; each QMP command is ``await handler(daemon, arguments)``.
The daemon's one NBD server lives in ``daemon.state["nbd"]``; every export it
serves is also in ``daemon.exports`` (id -> export), so the core's
``block-export-del`` and ``query-block-exports`` see exports however they were added.
"""

from __future__ import annotations

from typing import Any

from blockgraph.errors import BlockGraphError
from blockgraph.options import parse_bool, parse_int

from .server import NbdServer
from .server_export import NbdExport, new_export

STATE_KEY = "nbd"
EXPORT_KEYS = {"type", "id", "node-name", "writable", "writethrough", "iothread", "fixed-iothread", "name",
               "description", "bitmaps", "allocation-depth"}
SERVER_KEYS = {"addr", "tls-creds", "tls-authz", "max-connections"}


def _error(desc: str) -> Exception:
    """A QMP GenericError when the monitor is installed, else a plain BlockGraphError with the same text."""
    try:
        from blockgraph.qmp.protocol import QMPError
    except ImportError:
        return BlockGraphError(desc)
    return QMPError(desc)


def _unexpected(options: dict[str, Any], allowed: set[str]) -> None:
    for key in options:
        if key not in allowed:
            raise _error(f"Parameter '{key}' is unexpected")


def _server(daemon: Any) -> NbdServer:
    server = daemon.state.get(STATE_KEY)
    if server is None:
        raise _error("NBD server not running")
    return server


def _node(daemon: Any, name: str, *, device: bool) -> Any:
    """A node by name, or (``device``, as nbd-server-add) also a BlockBackend's root (QEMU's bdrv_lookup_bs)."""
    lookup = getattr(daemon, "lookup", None)
    if lookup is not None:
        return lookup(name if device else None, name)
    node = daemon.session.nodes.get(name)
    if node is None:
        raise _error(f"Cannot find device='{name if device else ''}' nor node-name='{name}'")
    return node


def _bitmaps(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, dict):  # keyval lists arrive as {"0": ...} before listification
        return tuple(str(v) for _, v in sorted(value.items()))
    return tuple(str(v) for v in value)


class ServedExport:
    """What ``daemon.exports`` holds: the NbdExport plus ``delete(mode)`` (the hookspec's export object)."""

    type = "nbd"

    def __init__(self, server: NbdServer, exp: NbdExport) -> None:
        self.server, self.exp = server, exp

    @property
    def id(self) -> str:
        return self.exp.id

    @property
    def node_name(self) -> str:
        return self.exp.node_name

    @property
    def shutting_down(self) -> bool:
        return self.exp.shutting_down

    @property
    def name(self) -> str:
        return self.exp.name

    async def delete(self, mode: str = "safe") -> None:
        if mode == "safe" and self.exp.clients:
            raise _error(f"export '{self.exp.id}' still in use")
        await self.server.remove_export(self.exp, hard=mode == "hard")
        await self.exp.close()

    def info(self) -> dict[str, Any]:
        return self.exp.info()


class NbdExportType:
    """Registered as export type ``nbd`` (``--export type=nbd,...``, ``block-export-add``)."""

    name = "nbd"

    @staticmethod
    async def start_server(daemon: Any, options: dict[str, Any]) -> NbdServer:
        """``--nbd-server`` / ``nbd-server-start``: addr (flat or legacy SocketAddress), max-connections."""
        _unexpected(options, SERVER_KEYS)
        if daemon.state.get(STATE_KEY) is not None:
            raise _error("NBD server already running")
        if "addr" not in options:
            raise _error("Parameter 'addr' is missing")
        if options.get("tls-creds") is not None:
            raise _error("TLS is not supported by blockgraph's NBD server yet (tls-creds)")
        if options.get("tls-authz") is not None:
            raise _error("'tls-authz' is only supported when 'tls-creds' is set")
        limit = parse_int(options.get("max-connections", 0))
        if limit < 0:
            raise _error("Parameter 'max-connections' expects uint32")
        server = NbdServer(max_connections=limit)
        await server.listen(options["addr"])
        daemon.state[STATE_KEY] = server
        return server

    @staticmethod
    async def stop_server(daemon: Any) -> None:
        server = daemon.state.pop(STATE_KEY, None)
        if server is None:
            return
        for export_id, served in list(daemon.exports.items()):
            if isinstance(served, ServedExport) and served.server is server:
                await served.delete("hard")
                daemon.exports.pop(export_id, None)
                daemon.emit("BLOCK_EXPORT_DELETED", {"id": export_id})
        await server.close()

    @staticmethod
    async def create(daemon: Any, options: dict[str, Any]) -> ServedExport:
        """``block-export-add type=nbd``: id, node-name, name (default: node-name), description, writable,
        writethrough, bitmaps, allocation-depth."""
        _unexpected(options, EXPORT_KEYS)
        server = _server(daemon)
        node_name = str(options["node-name"])
        node = _node(daemon, node_name, device=False)
        name = str(options.get("name", node_name))
        if server.find_export(name) is not None:
            raise _error(f"NBD server already has export named '{name}'")
        exp = await new_export(
            daemon.session, node, name=name, description=str(options.get("description", "")),
            writable=parse_bool(options.get("writable", False)),
            writethrough=parse_bool(options.get("writethrough", False)),
            allocation_depth=parse_bool(options.get("allocation-depth", False)),
            bitmaps=_bitmaps(options.get("bitmaps")), export_id=str(options["id"]))
        try:
            server.add_export(exp)
        except BlockGraphError:
            await exp.close()
            raise
        return ServedExport(server, exp)


# ---------------------------------------------------------------- QMP commands


async def qmp_nbd_server_start(daemon: Any, args: dict[str, Any]) -> None:
    await NbdExportType.start_server(daemon, dict(args))


async def qmp_nbd_server_stop(daemon: Any, args: dict[str, Any]) -> None:
    _unexpected(args, set())
    _server(daemon)
    await NbdExportType.stop_server(daemon)


async def qmp_nbd_server_add(daemon: Any, args: dict[str, Any]) -> None:
    """The legacy command: the export id is its name, and a read-only node is exported read-only."""
    _unexpected(args, {"device", "name", "description", "writable", "bitmap", "allocation-depth"})
    if "device" not in args:
        raise _error("Parameter 'device' is missing")
    server = _server(daemon)
    device = str(args["device"])
    name = str(args.get("name", device))
    if name in daemon.exports:
        raise _error(f"Block export id '{name}' is already in use")
    if server.find_export(name) is not None:
        raise _error(f"NBD server already has export named '{name}'")
    node = _node(daemon, device, device=True)
    writable = parse_bool(args.get("writable", False)) and not node.read_only
    options: dict[str, Any] = {"type": "nbd", "id": name, "node-name": node.name, "name": name,
                               "writable": writable, "allocation-depth": args.get("allocation-depth", False)}
    if "description" in args:
        options["description"] = args["description"]
    if "bitmap" in args:
        options["bitmaps"] = [args["bitmap"]]
    daemon.exports[name] = await NbdExportType.create(daemon, options)


async def qmp_nbd_server_remove(daemon: Any, args: dict[str, Any]) -> None:
    _unexpected(args, {"name", "mode"})
    if "name" not in args:
        raise _error("Parameter 'name' is missing")
    mode = str(args.get("mode", "safe"))
    if mode not in ("safe", "hard"):
        raise _error(f"Parameter 'mode' does not accept value '{mode}'")
    server = _server(daemon)
    name = str(args["name"])
    for export_id, served in daemon.exports.items():
        if isinstance(served, ServedExport) and served.server is server and served.name == name:
            await served.delete(mode)
            daemon.exports.pop(export_id, None)
            daemon.emit("BLOCK_EXPORT_DELETED", {"id": export_id})
            return
    raise _error(f"Export '{name}' is not found")
