"""The NBD server: listening sockets, a table of exports, and one task per client.

``NbdServer`` is what ``blockgraph nbd``, the ``nbd`` export type and the QMP
``nbd-server-*`` commands share. It listens on 127.0.0.1 unless told otherwise,
accepts at most ``max_connections`` clients at once (0: no limit; further
clients wait in the listen backlog, as with qemu-nbd's ``-e``), gives each client
``handshake_timeout`` seconds to pick an export, and drops a client that breaks
the protocol or stops reading without disturbing the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from blockgraph.errors import BlockGraphError, OptionError
from blockgraph.log import get_logger

from . import protocol as P
from .server_conn import Connection
from .server_export import NbdExport
from .server_handshake import Negotiation
from .server_io import Channel, PeerGone

log = get_logger(__name__)
DEFAULT_HOST = "127.0.0.1"


def parse_address(addr: Any) -> dict[str, str]:
    """A QAPI SocketAddress (``{type: inet, host, port}`` / ``{type: unix, path}``), or the legacy form with
    its ``data`` wrapper that ``nbd-server-start`` takes, as ``{"type", "host", "port"}`` or ``{"type", "path"}``."""
    if not isinstance(addr, dict):
        raise OptionError("Invalid parameter type for 'addr', expected: object")
    kind = addr.get("type")
    body = addr.get("data") if isinstance(addr.get("data"), dict) else addr
    if kind == "inet":
        if "host" not in body:
            raise OptionError("Parameter 'addr.host' is missing")
        return {"type": "inet", "host": str(body["host"]), "port": str(body.get("port", P.DEFAULT_PORT))}
    if kind == "unix":
        if "path" not in body:
            raise OptionError("Parameter 'addr.path' is missing")
        return {"type": "unix", "path": str(body["path"])}
    if kind in ("fd", "vsock"):
        raise OptionError(f"addr.type '{kind}' is not supported by blockgraph's NBD server")
    raise OptionError(f"Parameter 'addr.type' does not accept value '{kind}'")


class Client:
    """One accepted connection, and the export it chose once it has."""

    def __init__(self, ch: Channel, peer: str) -> None:
        self.ch, self.peer = ch, peer
        self.export: NbdExport | None = None
        self.task: asyncio.Task | None = None


class NbdServer:
    def __init__(self, *, max_connections: int = 0, handshake_timeout: float | None = 10.0,
                 stall_timeout: float | None = 60.0) -> None:
        if max_connections < 0:
            raise OptionError(f"Invalid shared device number '{max_connections}'")
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.stall_timeout = stall_timeout
        self.exports: dict[str, NbdExport] = {}
        self.clients: set[Client] = set()
        self.on_client_closed: Callable[[Client, bool], None] | None = None
        self._listeners: list[socket.socket] = []
        self._unix_paths: list[str] = []
        self._accepting: list[asyncio.Task] = []
        self._slot_free = asyncio.Event()
        self.closed = False

    @property
    def multi_conn(self) -> bool:
        """A client may open several connections only if the server lets them all in (qemu-nbd ``-e``)."""
        return self.max_connections != 1

    # ------------------------------------------------------------ exports

    def add_export(self, exp: NbdExport) -> None:
        if exp.name in self.exports:
            raise OptionError(f"NBD server already has export named '{exp.name}'")
        exp.multi_conn = self.multi_conn
        self.exports[exp.name] = exp

    def find_export(self, name: str) -> NbdExport | None:
        return self.exports.get(name)

    async def remove_export(self, exp: NbdExport, *, hard: bool = False) -> None:
        """Stop offering ``exp``; ``hard`` also disconnects its clients. Returns once nobody uses it."""
        if self.exports.get(exp.name) is exp:
            del self.exports[exp.name]
        exp.shutting_down = True
        users = [c for c in self.clients if c.export is exp]
        if hard:
            for c in users:
                c.ch.abort()
        tasks = [c.task for c in users if c.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------ listening

    async def listen(self, addr: Any, backlog: int | None = None, *, accept: bool = True) -> None:
        """Bind and (unless ``accept=False``: see :meth:`accept`) accept; ``addr`` as :func:`parse_address`."""
        a = parse_address(addr)
        backlog = backlog or (min(self.max_connections, socket.SOMAXCONN) if self.max_connections
                              else socket.SOMAXCONN)
        socks = self._unix_socket(a["path"], backlog) if a["type"] == "unix" else \
            await self._inet_sockets(a["host"], a["port"], backlog)
        self._listeners += socks
        if accept:
            self.accept()

    def adopt(self, sock: socket.socket) -> None:
        """Serve on a socket someone else bound and made listen (systemd socket activation); once
        :meth:`accept` runs. It is closed with the server, and its unix path, if any, is not ours to remove."""
        sock.setblocking(False)
        self._listeners.append(sock)

    def accept(self) -> None:
        """Start accepting on every bound socket. Until then clients wait in the listen backlog, as with
        qemu-nbd, which binds before it opens the image but accepts only once the export exists."""
        for s in self._listeners[len(self._accepting):]:
            self._accepting.append(asyncio.create_task(self._accept_loop(s)))

    def _unix_socket(self, path: str, backlog: int) -> list[socket.socket]:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)  # a stale socket from an earlier run, as QEMU does
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(path)
            s.listen(backlog)
        except OSError as e:
            s.close()
            raise BlockGraphError(f"Failed to bind socket to {path}: {e.strerror}") from None
        s.setblocking(False)
        # Absolute now: a daemon (--fork, --daemonize) moves to "/" before it removes the socket at exit.
        self._unix_paths.append(os.path.abspath(path))
        return [s]

    async def _inet_sockets(self, host: str, port: str, backlog: int) -> list[socket.socket]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise BlockGraphError(f"address resolution failed for {host}:{port}: {e.strerror}") from None
        out: list[socket.socket] = []
        err: OSError | None = None
        for family, stype, proto, _canon, sockaddr in infos:
            s = socket.socket(family, stype, proto)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if out and sockaddr[1] == 0:  # port 0: every address on the port the first one got
                    sockaddr = (sockaddr[0], out[0].getsockname()[1], *sockaddr[2:])
                s.bind(sockaddr)
                s.listen(backlog)
            except OSError as e:
                s.close()
                err = e
                continue
            s.setblocking(False)
            out.append(s)
        if not out:
            reason = err.strerror if err else "no address"
            raise BlockGraphError(f"Failed to find an available port: {reason}")
        return out

    def addresses(self) -> list[Any]:
        """What each listening socket is bound to (a (host, port) tuple or a unix path)."""
        return [s.getsockname() for s in self._listeners]

    @property
    def port(self) -> int | None:
        for s in self._listeners:
            if s.family in (socket.AF_INET, socket.AF_INET6):
                return s.getsockname()[1]
        return None

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while not self.closed:
            while self.max_connections and len(self.clients) >= self.max_connections:
                self._slot_free.clear()
                await self._slot_free.wait()
            try:
                sock, peer = await loop.sock_accept(lsock)
            except OSError as e:
                log.warning("nbd_accept_failed", reason=str(e))
                await asyncio.sleep(0.1)
                continue
            client = Client(Channel(sock, stall_timeout=self.stall_timeout), str(peer))
            self.clients.add(client)
            client.task = asyncio.create_task(self._serve(client))

    # ------------------------------------------------------------ one client

    async def _serve(self, client: Client) -> None:
        negotiated = False
        clog = log.bind(peer=client.peer)
        try:
            neg = Negotiation(client.ch, self.find_export, lambda: list(self.exports.values()))
            try:
                async with asyncio.timeout(self.handshake_timeout):
                    agreed = await neg.run()
            except TimeoutError:
                clog.info("nbd_handshake_timeout")
                return
            if agreed is None or agreed.export.shutting_down:
                return
            negotiated = True
            client.export = agreed.export
            agreed.export.clients.add(client)
            clog.debug("nbd_client_connected", export=agreed.export.name, structured=agreed.structured)
            await Connection(client.ch, agreed, clog).run()
        except P.ProtocolError as e:
            clog.info("nbd_client_dropped", reason=str(e))
        except PeerGone:
            pass
        except Exception as e:  # never let one client's surprise reach the others
            clog.error("nbd_client_failed", reason=f"{type(e).__name__}: {e}")
        finally:
            client.ch.close()
            self.clients.discard(client)
            if client.export is not None:
                client.export.clients.discard(client)
            self._slot_free.set()
            if self.on_client_closed is not None:
                self.on_client_closed(client, negotiated)

    # ------------------------------------------------------------ shutdown

    def stop_listening(self) -> None:
        for t in self._accepting:
            t.cancel()
        self._accepting.clear()
        for s in self._listeners:
            s.close()
        self._listeners.clear()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths.clear()

    async def close(self, *, close_exports: bool = True) -> None:
        """Stop listening, disconnect every client, and (by default) release every export's node."""
        self.closed = True
        self.stop_listening()
        for c in list(self.clients):
            c.ch.abort()
        tasks = [c.task for c in self.clients if c.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if close_exports:
            for exp in list(self.exports.values()):
                exp.shutting_down = True
                await exp.close()
            self.exports.clear()
