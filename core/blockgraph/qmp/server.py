"""QMP listeners (unix socket, TCP, stdio), one state per client, events to every negotiated client.

Commands run one at a time across all clients, as QEMU's monitor dispatcher runs them
under the big lock: a command never sees the graph half-changed by another one.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import TYPE_CHECKING, Any

from ..log import get_logger
from .protocol import CommandNotFound, QMPError, Splitter, check_args, check_request, encode, event, greeting, parse

if TYPE_CHECKING:
    from .registry import Command

log = get_logger(__name__)


class Client:
    """One QMP connection."""

    def __init__(self, server: QMPServer, reader: asyncio.StreamReader, writer: Any, pretty: bool) -> None:
        self.server, self.reader, self.writer, self.pretty = server, reader, writer, pretty
        self.negotiated = False
        self.closed = False

    def send(self, msg: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            self.writer.write(encode(msg, self.pretty))
        except (ConnectionError, RuntimeError, OSError):
            self.closed = True

    async def serve(self) -> None:
        self.send(greeting())
        splitter = Splitter()
        try:
            while not self.closed:
                data = await self.reader.read(65536)
                if not data:
                    break
                for text in splitter.feed(data):
                    if isinstance(text, QMPError):
                        self.send(text.reply())
                        continue
                    await self.handle(text)
                await self._drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            self.server.clients.discard(self)
            try:
                self.writer.close()
            except (ConnectionError, RuntimeError, OSError):
                pass

    async def _drain(self) -> None:
        drain = getattr(self.writer, "drain", None)
        if drain is not None and not self.closed:
            try:
                await drain()
            except (ConnectionError, OSError):
                self.closed = True

    async def handle(self, text: bytes) -> None:
        msg: dict[str, Any] = {}
        try:
            msg = parse(text)
            name, args = check_request(msg)
            result = await self.dispatch(name, args)
            reply: dict[str, Any] = {"return": result}
        except QMPError as e:
            reply = e.reply()
        except Exception as e:  # a bug in one command must not take the monitor down
            log.exception("qmp_command_failed", command=msg.get("execute"))
            reply = QMPError(f"{type(e).__name__}: {e}").reply()
        if "id" in msg:
            reply["id"] = msg["id"]
        self.send(reply)

    async def dispatch(self, name: str, args: dict[str, Any]) -> Any:
        if name == "qmp_capabilities":
            if self.negotiated:
                raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
            check_args(args, {"*enable": "list"})
            for cap in args.get("enable", []):
                if cap != "oob":
                    raise QMPError(f"Parameter 'enable' does not accept value '{cap}'")
                raise QMPError("Capability 'oob' not available")
            self.negotiated = True
            return {}
        if not self.negotiated:
            raise CommandNotFound("Expecting capabilities negotiation with 'qmp_capabilities'")
        cmd = self.server.commands.get(name)
        if cmd is None:
            raise CommandNotFound(f"The command {name} has not been found")
        async with self.server.lock:
            return await cmd.run(self.server.daemon, args)


class QMPServer:
    """Every monitor of one daemon: listeners, clients and the command table."""

    def __init__(self, daemon: Any, commands: dict[str, Command]) -> None:
        self.daemon, self.commands = daemon, commands
        self.clients: set[Client] = set()
        self.listeners: list[asyncio.AbstractServer] = []
        self.paths: list[str] = []
        self.lock = asyncio.Lock()
        self.tasks: set[asyncio.Task] = set()

    def _spawn(self, reader: asyncio.StreamReader, writer: Any, pretty: bool,
               connected: asyncio.Event | None) -> None:
        client = Client(self, reader, writer, pretty)
        self.clients.add(client)
        if connected is not None:
            connected.set()
        task = asyncio.ensure_future(client.serve())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def listen_unix(self, path: str, pretty: bool = False, connected: asyncio.Event | None = None) -> None:
        path = os.path.abspath(path)  # removed at exit, after --daemonize has changed to /
        if os.path.exists(path) and not os.path.isdir(path):
            os.unlink(path)  # QEMU replaces a stale socket too
        server = await asyncio.start_unix_server(lambda r, w: self._spawn(r, w, pretty, connected), path=path)
        self.listeners.append(server)
        self.paths.append(path)

    async def listen_tcp(self, host: str, port: int, pretty: bool = False,
                         connected: asyncio.Event | None = None) -> None:
        server = await asyncio.start_server(lambda r, w: self._spawn(r, w, pretty, connected), host=host,
                                            port=port, reuse_address=True)
        self.listeners.append(server)

    async def attach_stdio(self, pretty: bool = False) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        self._spawn(reader, writer, pretty, None)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        msg = event(name, data)
        for client in list(self.clients):
            if client.negotiated:
                client.send(msg)

    async def close(self) -> None:
        for server in self.listeners:
            server.close()
        for client in list(self.clients):
            await client._drain()
            client.closed = True
            try:
                client.writer.close()
            except (ConnectionError, RuntimeError, OSError):
                pass
        for task in list(self.tasks):
            task.cancel()
        for path in self.paths:
            try:
                os.unlink(path)
            except OSError:
                pass
