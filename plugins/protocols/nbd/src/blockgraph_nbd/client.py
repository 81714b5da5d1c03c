"""The ``nbd`` protocol driver: a block node backed by an export on an NBD server (QEMU's block/nbd.c)."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from blockgraph.driver import BlockStatus, Concurrency, DriverKind, ReqFlags, Status
from blockgraph.errors import BlockIOError, NotSupported, OpenError, OptionError
from blockgraph.options import one_of, opt, optional, parse_int, parse_str

from . import protocol as p
from .client_conn import Connection, ConnectionLost, ReplyError, ServerError
from .client_handshake import Address, ExportInfo, HandshakeError, connect, handshake
from .protocol import Cmd, CmdFlag, ProtocolError, TransmissionFlag

URL_SCHEMES = {"nbd": "inet", "nbd+tcp": "inet", "nbd+unix": "unix"}
INT_MAX = (1 << 31) - 1
MAX_STATUS_REQUEST = 0xFFFFFFFF
HANDSHAKE_TIMEOUT = 30.0  # a server that accepts but never negotiates must not hang the open


def _port(value: Any) -> str:
    return str(parse_int(value)) if isinstance(value, int) else parse_str(value)


def _delay(value: Any) -> int:
    n = parse_int(value)
    if n < 0:
        raise ValueError(f"must not be negative, got {n}")
    return n


@attrs.frozen(kw_only=True)
class NbdOptions:
    server_type: str | None = opt(None, key="server.type", converter=optional(one_of("inet", "unix")),
                                  help="inet or unix")
    server_host: str | None = opt(None, key="server.host", converter=optional(parse_str), help="server host")
    server_port: str | None = opt(None, key="server.port", converter=optional(_port),
                                  help="server port (default 10809)")
    server_path: str | None = opt(None, key="server.path", converter=optional(parse_str),
                                  help="unix socket path")
    export: str | None = opt(None, converter=optional(parse_str), help="export name (default empty)")
    tls_creds: str | None = opt(None, key="tls-creds", converter=optional(parse_str),
                                help="TLS credentials object (not supported yet)")
    tls_hostname: str | None = opt(None, key="tls-hostname", converter=optional(parse_str))
    x_dirty_bitmap: str | None = opt(None, key="x-dirty-bitmap", converter=optional(parse_str),
                                     help="meta context whose flags block status reports instead of "
                                          "base:allocation, e.g. qemu:dirty-bitmap:NAME")
    reconnect_delay: int = opt(0, key="reconnect-delay", converter=_delay,
                               help="seconds requests wait for a reconnection before failing")
    open_timeout: int = opt(0, key="open-timeout", converter=_delay,
                            help="seconds to keep retrying the first connection")
    filename: str | None = opt(None, converter=optional(parse_str), help="an nbd: URL instead of server/export")


def parse_nbd_filename(filename: str) -> dict[str, Any]:
    """Options from ``nbd://host[:port]/export``, ``nbd+unix:///export?socket=PATH``,
    or the legacy ``nbd:host:port[:exportname=X]`` / ``nbd:unix:PATH[:exportname=X]``."""
    bad = OptionError("No valid URL specified")
    scheme = filename.split(":", 1)[0]
    if "://" in filename:
        if scheme not in URL_SCHEMES:
            raise bad
        u = urlsplit(filename)
        export = unquote(u.path[1:] if u.path.startswith("/") else u.path)
        query = parse_qs(u.query, keep_blank_values=True)
        out: dict[str, Any] = {}
        if URL_SCHEMES[scheme] == "unix":
            if u.netloc or list(query) != ["socket"] or len(query["socket"]) != 1:
                raise bad
            out["server"] = {"type": "unix", "path": query["socket"][0]}
        else:
            if query or not u.hostname:
                raise bad
            try:
                port = u.port or p.DEFAULT_PORT
            except ValueError:
                raise bad from None
            out["server"] = {"type": "inet", "host": u.hostname, "port": str(port)}
        if export:
            out["export"] = export
        return out
    if scheme != "nbd":
        raise bad
    rest = filename[4:]
    if not rest:
        raise OptionError("NBD server address missing")
    export = None
    if ":exportname=" in rest:
        rest, export = rest.split(":exportname=", 1)
    if rest.startswith("unix:"):
        out = {"server": {"type": "unix", "path": rest[5:]}}
        if not rest[5:]:
            raise bad
    else:
        if rest.startswith("["):
            host, sep, port = rest[1:].partition("]:")
            if not sep:
                host, port = rest[1:].rstrip("]"), ""
        else:
            host, _, port = rest.partition(":")
        if not host or ":" in port:
            raise bad
        out = {"server": {"type": "inet", "host": host, "port": port or str(p.DEFAULT_PORT)}}
    if export is not None:
        out["export"] = export
    return out


def address_of(o: NbdOptions) -> Address:
    if o.server_type is None:
        raise OptionError("NBD server address missing")
    if o.server_type == "unix":
        if not o.server_path:
            raise OptionError("Parameter 'path' is missing")
        return Address("unix", path=o.server_path)
    if not o.server_host:
        raise OptionError("Parameter 'host' is missing")
    try:
        port = int(o.server_port or p.DEFAULT_PORT)
    except ValueError:
        raise OptionError(f"Invalid port '{o.server_port}'", driver="nbd", option="server.port") from None
    return Address("inet", host=o.server_host, port=port)


class NbdDriver:
    name: ClassVar[str] = "nbd"
    kind: ClassVar[DriverKind] = DriverKind.PROTOCOL
    api_version: ClassVar[int] = 1
    concurrency: ClassVar[Concurrency] = Concurrency.PARALLEL
    Options: ClassVar[type] = NbdOptions
    protocols: ClassVar[tuple[str, ...]] = tuple(URL_SCHEMES)

    supported_write_flags: ReqFlags = ReqFlags.NONE
    supported_zero_flags: ReqFlags = ReqFlags.NONE

    @classmethod
    def parse_filename(cls, filename: str) -> dict[str, Any]:
        return parse_nbd_filename(filename)

    # -------------------------------------------------------------- open / close

    async def open(self, node: Any, options: NbdOptions) -> None:
        if options.filename is not None:
            if options.server_type or options.server_host or options.server_path or options.export is not None:
                raise OptionError("No valid URL specified: server or export given together with a filename",
                                  driver="nbd", option="filename")
            options = attrs.evolve(options, filename=None, **_flat_fields(parse_nbd_filename(options.filename)))
        if options.tls_creds is not None:
            raise OptionError("TLS is not supported yet by this NBD client", driver="nbd", option="tls-creds")
        self.node, self.options = node, options
        self.addr = address_of(options)
        self.export = options.export or ""
        self.context = options.x_dirty_bitmap or p.CONTEXT_BASE_ALLOCATION
        self.queries = [self.context] + ([p.CONTEXT_ALLOCATION_DEPTH]
                                         if self.context != p.CONTEXT_ALLOCATION_DEPTH else [])
        self.closing = False
        self.conn: Connection | None = None
        self.connected = asyncio.Event()
        self.lost_at = 0.0
        self.lost_why = ""
        self.reconnector: asyncio.Task[None] | None = None
        conn = await self._first_connection()
        info = conn.info
        if info.flags & TransmissionFlag.READ_ONLY and not node.read_only:
            conn.fail(ConnectionLost("closed"))
            raise OpenError("Could not open image: Permission denied")  # qemu-io's text for a read-only export
        if options.x_dirty_bitmap and self.context not in info.contexts:
            conn.fail(ConnectionLost("closed"))
            raise OpenError(f"requested x-dirty-bitmap {self.context} not found")
        self.info = info
        self._use(conn)
        self._apply_limits(info)

    async def _first_connection(self) -> Connection:
        deadline = time.monotonic() + self.options.open_timeout
        while True:
            try:
                return await self._connect()
            except (OSError, ProtocolError) as e:
                if time.monotonic() >= deadline:
                    why = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e)
                    raise OpenError(f"Failed to connect to '{self.addr}': {why}") from None
            except HandshakeError as e:
                raise OpenError(str(e)) from None
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    async def _connect(self) -> Connection:
        sock = await connect(self.addr)
        try:
            info = await asyncio.wait_for(handshake(sock, self.export, self.queries), HANDSHAKE_TIMEOUT)
        except TimeoutError:
            sock.close()
            raise ProtocolError(f"server did not complete the handshake within {HANDSHAKE_TIMEOUT:g} s") from None
        except BaseException:
            sock.close()
            raise
        return Connection(sock, info, on_broken=self._lost)

    def _use(self, conn: Connection) -> None:
        info = conn.info
        self.conn = conn
        self.flags = info.flags
        self.status_ctx = info.contexts.get(self.context)
        self.depth_ctx = info.contexts.get(p.CONTEXT_ALLOCATION_DEPTH)
        fua = ReqFlags.FUA if info.flags & TransmissionFlag.SEND_FUA else ReqFlags.NONE
        self.supported_write_flags = fua
        self.supported_zero_flags = fua | ReqFlags.MAY_UNMAP | ReqFlags.NO_FALLBACK
        self.connected.set()

    def _apply_limits(self, info: ExportInfo) -> None:
        minimum = info.min_block
        if not minimum:
            # Without advertised sizes, sub-sector access is safe only in these cases (as QEMU reasons).
            minimum = 1 if info.size % 512 or self.status_ctx is not None else 512
        maximum = min(p.MAX_BUFFER, info.max_block or p.MAX_BUFFER)
        maximum -= maximum % minimum
        self.node.set_limits(request_alignment=minimum, max_transfer=maximum, max_pwrite_zeroes=maximum,
                             max_pdiscard=INT_MAX - INT_MAX % minimum,
                             opt_transfer=max(info.preferred_block, 0))

    async def close(self) -> None:
        self.closing = True
        if self.reconnector is not None:
            self.reconnector.cancel()
            await asyncio.wait([self.reconnector])
        if self.conn is not None:
            await self.conn.disconnect()

    async def getlength(self) -> int:
        return self.info.size

    def exact_filename(self) -> str:
        """The URL QEMU rebuilds from the options (nbd_refresh_filename), e.g. for the img info 'image:' line."""
        a = self.addr
        if a.type == "unix":
            return f"nbd+unix:///{self.export}?socket={a.path}" if self.export else f"nbd+unix://?socket={a.path}"
        return f"nbd://{a.host}:{a.port}/{self.export}" if self.export else f"nbd://{a.host}:{a.port}"

    def allocated_size(self) -> None:
        """Unknown over NBD (img info: "disk size: unavailable")."""
        return None

    # -------------------------------------------------------------- reconnection

    def _lost(self, conn: Connection) -> None:
        if self.conn is not conn:
            return
        self.conn = None
        self.connected.clear()
        self.lost_at = time.monotonic()
        self.lost_why = str(conn.broken or "")
        if self.options.reconnect_delay and not self.closing and self.reconnector is None:
            self.reconnector = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        pause = 0.05
        try:
            while not self.closing:
                try:
                    conn = await self._connect()
                except (OSError, ProtocolError, HandshakeError):
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
                if conn.info.size != self.info.size or (conn.info.flags & TransmissionFlag.READ_ONLY and \
                        not self.node.read_only):
                    conn.fail(ConnectionLost("export changed"))  # not the export we had: keep trying
                    await asyncio.sleep(pause)
                    continue
                self._use(conn)
                return
        finally:
            self.reconnector = None

    async def _connection(self, deadline: float | None) -> Connection:
        conn = self.conn
        if conn is not None and conn.broken is None:
            return conn
        if conn is not None:
            self._lost(conn)
        if self.closing or not self.options.reconnect_delay:
            raise ConnectionLost(f"NBD connection is closed ({self.lost_why})" if self.lost_why else
                                 "NBD connection is closed")
        if deadline is None:
            deadline = self.lost_at + self.options.reconnect_delay
        try:
            await asyncio.wait_for(self.connected.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise ConnectionLost(f"NBD server at {self.addr} is unreachable (reconnect-delay expired)") from None
        assert self.conn is not None
        return self.conn

    async def _call(self, op: str, cmd: int, offset: int, length: int, flags: int = 0,
                    payload: memoryview | None = None, buf: memoryview | None = None) -> Any:
        """One request, re-sent on a new connection while reconnect-delay allows."""
        deadline: float | None = None
        while True:
            try:
                conn = await self._connection(deadline)
                return await conn.request(cmd, offset, length, flags, payload, buf)
            except ConnectionLost as e:
                if self.conn is not None and self.conn.broken is not None:
                    self._lost(self.conn)
                if self.closing or not self.options.reconnect_delay or \
                        (deadline is not None and time.monotonic() >= deadline):
                    raise BlockIOError(errno.EIO, node=self.node.node_name, op=op, offset=offset, length=length,
                                       detail=str(e)) from None
                if deadline is None:
                    deadline = (self.lost_at or time.monotonic()) + self.options.reconnect_delay
            except ServerError as e:
                raise BlockIOError(e.errno, node=self.node.node_name, op=op, offset=offset,
                                   length=length) from None
            except ReplyError as e:
                raise BlockIOError(errno.EIO, node=self.node.node_name, op=op, offset=offset, length=length,
                                   detail=str(e)) from None

    # -------------------------------------------------------------- data

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        n = len(buf)
        size = self.info.size
        if offset + n > size:  # the sector-rounded tail past an unaligned export reads as zeros
            tail = offset + n - max(offset, size)
            buf[n - tail:] = bytes(tail)
            n -= tail
            if not n:
                return
            buf = buf[:n]
        await self._call("read", Cmd.READ, offset, n, 0, buf=buf)

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        cflags = CmdFlag.FUA if flags & ReqFlags.FUA and self.flags & TransmissionFlag.SEND_FUA else 0
        await self._call("write", Cmd.WRITE, offset, len(buf), cflags, payload=buf)

    async def flush(self) -> None:
        if self.flags & TransmissionFlag.SEND_FLUSH:
            await self._call("flush", Cmd.FLUSH, 0, 0)

    async def pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        if not self.flags & TransmissionFlag.SEND_WRITE_ZEROES:
            raise NotSupported("NBD server does not support write zeroes")
        cflags = 0 if flags & ReqFlags.MAY_UNMAP else CmdFlag.NO_HOLE
        if flags & ReqFlags.FUA and self.flags & TransmissionFlag.SEND_FUA:
            cflags |= CmdFlag.FUA
        if flags & ReqFlags.NO_FALLBACK:
            if not self.flags & TransmissionFlag.SEND_FAST_ZERO:
                raise NotSupported("NBD server does not support fast zeroing")
            cflags |= CmdFlag.FAST_ZERO
        try:
            await self._call("write zeroes", Cmd.WRITE_ZEROES, offset, length, cflags)
        except BlockIOError as e:
            if e.errno == errno.ENOTSUP and cflags & CmdFlag.FAST_ZERO:
                raise NotSupported("NBD server cannot zero this range fast") from None
            raise

    async def pdiscard(self, offset: int, length: int) -> None:
        if self.flags & TransmissionFlag.SEND_TRIM:
            await self._call("discard", Cmd.TRIM, offset, length)

    async def cache(self, offset: int, length: int) -> None:
        """Ask the server to prefetch (NBD_CMD_CACHE); a no-op when it cannot."""
        if self.flags & TransmissionFlag.SEND_CACHE:
            await self._call("cache", Cmd.CACHE, offset, length)

    # -------------------------------------------------------------- block status

    async def _extent(self, context: str, offset: int, length: int) -> tuple[int, int]:
        length = min(length, MAX_STATUS_REQUEST - MAX_STATUS_REQUEST % self.node.graph_node.limits.request_alignment)
        req = await self._call("block status", Cmd.BLOCK_STATUS, offset, length, CmdFlag.REQ_ONE)
        extents = req.extents.get(context)
        if not extents:
            raise BlockIOError(errno.EIO, node=self.node.node_name, op="block status", offset=offset, length=length,
                               detail="NBD server sent no extent for the negotiated meta context")
        elen, eflags = extents[0]
        return min(elen, length), eflags

    async def block_status(self, offset: int, length: int, want_zero: bool) -> BlockStatus:
        size = self.info.size
        if offset >= size:  # the sector-rounded tail past an unaligned export
            return BlockStatus(Status.ZERO | Status.OFFSET_VALID, length, offset, self.node.graph_node)
        length = min(length, size - offset)
        if self.status_ctx is None:
            return BlockStatus(Status.DATA | Status.OFFSET_VALID, length, offset, self.node.graph_node)
        elen, eflags = await self._extent(self.context, offset, length)
        flags = Status.OFFSET_VALID
        if not eflags & p.STATE_HOLE:
            flags |= Status.DATA
        if eflags & p.STATE_ZERO:
            flags |= Status.ZERO
        return BlockStatus(flags, elen, offset, self.node.graph_node)

    async def allocation_depth(self, offset: int, length: int) -> tuple[int, int]:
        """(length, depth) from ``qemu:allocation-depth``: 0 unallocated, 1 the top image, n > 1 a backing file."""
        if self.depth_ctx is None:
            raise NotSupported("NBD server does not offer qemu:allocation-depth")
        return await self._extent(p.CONTEXT_ALLOCATION_DEPTH, offset, min(length, self.info.size - offset))


def _flat_fields(tree: dict[str, Any]) -> dict[str, Any]:
    """parse_nbd_filename's tree as NbdOptions field values."""
    server = tree.get("server", {})
    out: dict[str, Any] = {"server_type": server.get("type"), "server_host": server.get("host"),
                           "server_port": server.get("port"), "server_path": server.get("path")}
    if "export" in tree:
        out["export"] = tree["export"]
    return out
