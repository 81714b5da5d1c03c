"""The daemon's state: the graph, monitor-owned nodes, exports, objects, events and shutdown.

QMP commands, export types and the command-line options all act on one :class:`Daemon`.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
from typing import TYPE_CHECKING, Any

from ..log import get_logger
from ..node import Node
from ..plugins import dist_for
from ..qmp.protocol import QMPError

if TYPE_CHECKING:
    from ..plugins import PluginHost
    from ..qmp.server import QMPServer
    from ..session import Session

log = get_logger(__name__)

# QOM types QEMU's storage daemon knows; only throttle-group is a plain record here.
KNOWN_QOM_TYPES = ("throttle-group", "secret", "secret_keyring", "iothread", "tls-creds-x509", "tls-creds-psk",
                   "tls-creds-anon", "tls-cipher-suites", "authz-simple", "authz-list", "authz-listfile",
                   "authz-pam", "memory-backend-file", "memory-backend-ram", "memory-backend-memfd")
THROTTLE_KEYS = (*(f"{kind}-{op}{suffix}" for kind in ("iops", "bps") for op in ("total", "read", "write")
                    for suffix in ("", "-max", "-max-length")), "iops-size")


class Daemon:
    """One running storage daemon (or one in-process test harness)."""

    def __init__(self, host: PluginHost, session: Session) -> None:
        from ..qmp import registry
        from ..qmp.server import QMPServer

        self.host, self.session = host, session
        self.exports: dict[str, Any] = {}
        self.objects: dict[str, dict[str, Any]] = {}
        self.state: dict[str, Any] = {}
        self.monitor_owned: set[str] = set()
        self.throttle: dict[str, dict[str, Any]] = {}  # backend name -> block_set_io_throttle limits
        self.qmp: QMPServer = QMPServer(self, registry.build(host))
        self.shutdown_reason: str | None = None
        self._stop = asyncio.Event()

    # ------------------------------------------------------------ events and lifecycle

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        self.qmp.emit(name, data)

    def request_shutdown(self, reason: str = "host-qmp-quit") -> None:
        if self.shutdown_reason is None:
            self.shutdown_reason = reason
        self._stop.set()

    async def wait(self) -> str:
        await self._stop.wait()
        return self.shutdown_reason or "host-qmp-quit"

    async def close(self) -> None:
        """Stop serving, then flush and close every node: nothing acknowledged is lost."""
        async with self.qmp.lock:  # let a running command finish first
            for server in self.qmp.listeners:
                server.close()
        self.emit("SHUTDOWN", {"guest": False, "reason": self.shutdown_reason or "host-qmp-quit"})
        for export_id in list(self.exports):
            try:
                await self.delete_export(export_id, "hard", event=False)
            except Exception:
                log.exception("export_delete_failed", id=export_id)
        for name, entry in self.host.table("exports").items():
            stop = getattr(entry.target if not isinstance(entry.target, str) else None, "stop_server", None)
            if stop is not None:
                try:
                    await _maybe_await(stop(self))
                except Exception:
                    log.exception("export_server_stop_failed", type=name)
        await self.qmp.close()
        await self.session.close()

    def watch_backend(self, blk: Any, device: str | None = None) -> None:
        """Report the backend's I/O errors as BLOCK_IO_ERROR events (after its rerror/werror policy)."""

        def on_error(blk: Any, operation: str, action: str, err: Any) -> None:
            data: dict[str, Any] = {"device": blk.name or device or ""}
            if blk.root is not None:
                data["node-name"] = blk.node.name
            data.update({"operation": operation, "action": action, "nospace": err.errno == errno.ENOSPC,
                         "reason": err.strerror})
            self.emit("BLOCK_IO_ERROR", data)

        blk.on_error.append(on_error)

    # ------------------------------------------------------------ nodes

    def find_node(self, name: str) -> Node:
        node = self.session.nodes.get(name)
        if node is None:
            raise QMPError(f"Cannot find device='' nor node-name='{name}'")
        return node

    def lookup(self, device: str | None, node_name: str | None) -> Node:
        """QEMU's bdrv_lookup_bs: a backend's root by ``device`` or a node by ``node-name``."""
        if device is not None:
            blk = self.session.backends.get(device)
            if blk is not None:
                if blk.root is None:
                    raise QMPError(f"Device '{device}' has no medium")
                return blk.node
        if node_name is not None and node_name in self.session.nodes:
            return self.session.nodes[node_name]
        raise QMPError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")

    async def add_blockdev(self, tree: dict[str, Any]) -> Node:
        """blockdev-add / --blockdev: a monitor-owned node (it keeps a reference of its own)."""
        if "node-name" not in tree:
            self._check_options(tree)  # QEMU checks the options' shape before asking for the name
            raise QMPError("'node-name' must be specified for the root node")
        node = await self.session.open_node(dict(tree))
        node.refcnt += 1
        self.monitor_owned.add(node.name)
        return node

    def _check_options(self, tree: dict[str, Any]) -> None:
        from ..options import structure
        from ..session import COMMON_KEYS

        if "driver" not in tree:
            raise QMPError("Parameter 'driver' is missing")
        cls = self.session.registry.driver(str(tree["driver"]))
        skip = set(COMMON_KEYS) | set(getattr(cls, "child_options", ()))
        structure(cls.Options, {k: v for k, v in tree.items() if k not in skip}, driver=str(tree["driver"]))

    async def delete_blockdev(self, name: str) -> None:
        node = self.session.nodes.get(name)
        if node is None:
            raise QMPError(f"Failed to find node with node-name='{name}'")
        if any(not isinstance(c.parent, Node) for c in node.parents) or \
                any(getattr(e, "node_name", None) == name for e in self.exports.values()):
            raise QMPError(f"Node {name} is in use")
        if name not in self.monitor_owned:
            raise QMPError(f"Node {name} is not owned by the monitor")
        if node.parents:
            raise QMPError(f"Block device {name} is in use")
        self.monitor_owned.discard(name)
        from ..node import unref

        await unref(node)

    # ------------------------------------------------------------ exports

    def export_type(self, type_name: str) -> Any:
        entry = self.host.table("exports").get(type_name)
        if entry is None:
            dist = dist_for(type_name)
            raise QMPError(f"Export type '{type_name}' is provided by {dist}, which is not installed "
                           f"(pip install {dist})" if type_name in ("nbd", "fuse", "vhost-user-blk", "vduse-blk")
                           else f"Parameter 'type' does not accept value '{type_name}'")
        return entry.resolve()

    async def add_export(self, options: dict[str, Any]) -> Any:
        for key in ("type", "id", "node-name"):
            if key not in options:
                raise QMPError(f"Parameter '{key}' is missing")
        export_id, node_name = str(options["id"]), str(options["node-name"])
        target = self.export_type(str(options["type"]))
        if export_id in self.exports:
            raise QMPError(f"Block export id '{export_id}' is already in use")
        if node_name not in self.session.nodes and node_name not in self.session.backends:
            raise QMPError(f"Cannot find device='' nor node-name='{node_name}'")  # blk_exp_add's text
        # blockgraph also takes a backend's name (serve --drive id=...); the export gets the node's own name.
        node = self.lookup(node_name, node_name)
        export = await _maybe_await(target.create(self, {**options, "node-name": node.name}))
        self.exports[export_id] = export
        if getattr(export, "blk", None) is not None:
            self.watch_backend(export.blk)
        return export

    async def delete_export(self, export_id: str, mode: str = "safe", *, event: bool = True) -> None:
        export = self.exports.get(export_id)
        if export is None:
            raise QMPError(f"Export '{export_id}' is not found")
        if getattr(export, "shutting_down", False) and mode == "safe":
            raise QMPError(f"Export '{export_id}' is already shutting down")
        await _maybe_await(export.delete(mode))
        self.exports.pop(export_id, None)
        if event:
            self.emit("BLOCK_EXPORT_DELETED", {"id": export_id})

    async def start_export_server(self, type_name: str, options: dict[str, Any]) -> None:
        target = self.export_type(type_name)
        start = getattr(target, "start_server", None)
        if start is None:
            raise QMPError(f"Export type '{type_name}' has no server to start")
        await _maybe_await(start(self, options))

    # ------------------------------------------------------------ objects

    def add_object(self, props: dict[str, Any]) -> None:
        """--object / object-add. throttle-group is stored for the throttle filter to find."""
        qom_type = props.get("qom-type")
        if qom_type is None:
            raise QMPError("Parameter 'qom-type' is missing")
        if "id" not in props:
            raise QMPError("Parameter 'id' is missing")
        obj_id = str(props["id"])
        if obj_id in self.objects:
            raise QMPError(f"attempt to add duplicate property '{obj_id}' to object (type 'container')")
        entry = self.host.table("object_types").get(str(qom_type))
        if entry is not None:
            record = {**props, "object": entry.resolve()(self, dict(props))}
        elif qom_type == "throttle-group":
            record = dict(props)
            limits = props.get("limits", {})
            flat = {k: v for k, v in props.items() if k not in ("qom-type", "id", "limits")}
            for key in list(flat) + [f"limits.{k}" for k in limits]:
                bare = key.removeprefix("limits.").removeprefix("x-")
                if bare not in THROTTLE_KEYS:
                    raise QMPError(f"Parameter '{key}' is unexpected")
        elif qom_type in KNOWN_QOM_TYPES:
            raise QMPError(f"object type '{qom_type}' is not supported by blockgraph: no installed plugin "
                           "provides it")
        else:
            raise QMPError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
        self.objects[obj_id] = record

    def delete_object(self, obj_id: str) -> None:
        if obj_id not in self.objects:
            raise QMPError(f"object '{obj_id}' not found")
        del self.objects[obj_id]


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value

