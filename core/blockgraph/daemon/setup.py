"""Acting on the daemon's options, one at a time and in order, as qemu-storage-daemon does."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from ..options import parse_blockdev, parse_bool, parse_json, parse_keyval
from ..qmp.protocol import QMPError
from .argv import PROG
from .core import Daemon


def keyval_or_json(text: str, implied: str | None) -> dict[str, Any]:
    if text.lstrip().startswith("{"):
        return parse_json(text, "JSON")
    return parse_keyval(text, implied_key=implied)


class Setup:
    """The pieces of start-up that are not graph nodes: chardevs, monitors, the pid file."""

    def __init__(self, daemon: Daemon, *, daemonize: bool) -> None:
        self.daemon, self.daemonize = daemon, daemonize
        self.chardevs: dict[str, dict[str, Any]] = {}
        self.pidfile: str | None = None
        self.printed_help = False

    async def apply(self, name: str, value: str) -> None:
        handler = getattr(self, "opt_" + name.replace("-", "_"))
        await handler(value)

    async def opt_blockdev(self, value: str) -> None:
        await self.daemon.add_blockdev(parse_blockdev(value))

    async def opt_drive(self, value: str) -> None:
        from .drive import add_drive

        await add_drive(self.daemon, value)

    async def opt_object(self, value: str) -> None:
        if value == "help":
            print("List of user creatable objects:")
            for qom_type in sorted({"throttle-group", *self.daemon.host.table("object_types")}):
                print(f"  {qom_type}")
            self.printed_help = True
            return
        self.daemon.add_object(keyval_or_json(value, "qom-type"))

    async def opt_export(self, value: str) -> None:
        await self.daemon.add_export(keyval_or_json(value, "type"))

    async def opt_nbd_server(self, value: str) -> None:
        await self.daemon.start_export_server("nbd", keyval_or_json(value, None))

    async def opt_pidfile(self, value: str) -> None:
        self.pidfile = os.path.abspath(value)

    async def opt_trace(self, value: str) -> None:
        print(f"{PROG}: -T {value}: warning: tracing is not supported; "
              "use 'blockgraph --log-level debug serve ...'", file=sys.stderr)

    async def opt_chardev(self, value: str) -> None:
        opts = parse_keyval(value, implied_key="backend")
        backend = opts.pop("backend", None)
        if backend is None:
            raise QMPError("chardev: \"backend\" not specified")
        if backend not in ("socket", "stdio"):
            raise QMPError(f"'{backend}' is not a valid char driver name")
        chardev_id = opts.pop("id", None)
        if chardev_id is None:
            raise QMPError("chardev: no id specified")
        if chardev_id in self.chardevs:
            raise QMPError(f"attempt to add duplicate property '{chardev_id}' to object (type 'container')")
        if backend == "stdio":
            if self.daemonize:
                raise QMPError("cannot use stdio with -daemonize")
            for key in opts:
                if key not in ("signal", "mux", "logfile", "logappend"):
                    raise QMPError(f"Invalid parameter '{key}'")
        else:
            self._check_socket(opts)
        self.chardevs[chardev_id] = {"backend": backend, **opts}

    @staticmethod
    def _check_socket(opts: dict[str, Any]) -> None:
        allowed = ("path", "host", "port", "server", "wait", "ipv4", "ipv6", "nodelay", "abstract", "tight")
        for key in opts:
            if key not in allowed:
                raise QMPError(f"Invalid parameter '{key}'" if key not in ("telnet", "websocket", "tn3270",
                               "reconnect", "tls-creds", "fd") else f"socket option '{key}' is not supported")
        try:
            server = parse_bool(opts.get("server", False))
            opts["wait"] = parse_bool(opts.get("wait", True))
        except ValueError as e:
            raise QMPError(str(e)) from None
        if not server:
            raise QMPError("only server sockets (server=on) are supported for monitors")
        if "path" not in opts and "host" not in opts:
            raise QMPError("chardev: socket: neither 'path' nor 'host' given")
        if "host" in opts and "port" not in opts:
            raise QMPError("chardev: socket: no port given")

    async def opt_monitor(self, value: str) -> None:
        opts = parse_keyval(value, implied_key="chardev")
        for key in opts:
            if key not in ("chardev", "id", "mode", "pretty"):
                raise QMPError(f"Parameter '{key}' is unexpected")
        if "chardev" not in opts:
            raise QMPError("Parameter 'chardev' is missing")
        if opts.get("mode", "control") != "control":
            raise QMPError("Only QMP monitors (mode=control) are supported")
        try:
            pretty = parse_bool(opts.get("pretty", False))
        except ValueError as e:
            raise QMPError(str(e)) from None
        chardev = self.chardevs.get(opts["chardev"])
        if chardev is None:
            raise QMPError(f"chardev \"{opts['chardev']}\" not found")
        if chardev.get("in-use"):
            raise QMPError(f"Device '{opts['chardev']}' is in use")
        chardev["in-use"] = True
        qmp = self.daemon.qmp
        if chardev["backend"] == "stdio":
            await qmp.attach_stdio(pretty)
            return
        connected = asyncio.Event()
        try:
            if "path" in chardev:
                await qmp.listen_unix(chardev["path"], pretty, connected)
                where = f"unix:{chardev['path']},server=on"
            else:
                await qmp.listen_tcp(chardev["host"], int(chardev["port"]), pretty, connected)
                where = f"tcp:{chardev['host']}:{chardev['port']},server=on"
        except OSError as e:
            raise QMPError(f"Failed to bind socket: {e.strerror or e}") from None
        if chardev["wait"]:
            print(f"{PROG}: info: waiting for connection on: disconnected:{where}", file=sys.stderr, flush=True)
            await connected.wait()
