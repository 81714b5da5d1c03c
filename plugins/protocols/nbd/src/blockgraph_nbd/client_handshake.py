"""Client side of the NBD handshake: connect, negotiate options, list exports.

Runs on a non-blocking socket with the event loop's ``sock_*`` calls; the same socket then
carries the transmission phase (:mod:`client_conn`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import attrs

from . import protocol as p
from .protocol import Info, Opt, ProtocolError, Rep, TransmissionFlag


class HandshakeError(Exception):
    """The server refused what we asked for (unknown export, policy, ...); the text is for the user."""


@attrs.frozen
class Address:
    """Where the server is: ``inet`` host and port, or a ``unix`` socket path."""

    type: str
    host: str = ""
    port: int = p.DEFAULT_PORT
    path: str = ""

    def __str__(self) -> str:
        if self.type == "unix":
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class ExportInfo:
    """What the handshake established about one export."""

    name: str
    size: int
    flags: TransmissionFlag
    min_block: int = 0  # 0: the server sent no NBD_INFO_BLOCK_SIZE
    preferred_block: int = 0
    max_block: int = 0
    structured: bool = False
    contexts: dict[str, int] = attrs.Factory(dict)  # meta context name -> id
    description: str = ""


async def connect(addr: Address) -> socket.socket:
    """A connected non-blocking socket (TCP_NODELAY for inet)."""
    loop = asyncio.get_running_loop()
    if addr.type == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr.path)
        except BaseException:
            sock.close()
            raise
        return sock
    infos = await loop.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
    err: OSError | None = None
    for family, stype, proto, _, sa in infos:
        sock = socket.socket(family, stype, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, sa)
        except OSError as e:
            sock.close()
            err = e
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise err or OSError(f"cannot resolve {addr.host}")


async def recv_exact(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    while pos < n:
        got = await loop.sock_recv_into(sock, view[pos:])
        if not got:
            raise ConnectionResetError("server closed the connection during the handshake")
        pos += got
    return bytes(buf)


class _Negotiator:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.no_zeroes = False
        self.fixed = False

    async def send_option(self, option: int, data: bytes = b"") -> None:
        await self.loop.sock_sendall(self.sock, p.encode_option(option, data))

    async def reply(self, option: int) -> tuple[int, bytes]:
        hdr = p.decode_option_reply(await recv_exact(self.sock, p.OPTION_REPLY.size))
        if hdr.option != option:
            raise ProtocolError(f"option reply for option {hdr.option} while waiting for option {option}")
        if hdr.length > p.MAX_OPTION_LENGTH:
            raise ProtocolError(f"option reply of {hdr.length} bytes is too large")
        data = await recv_exact(self.sock, hdr.length) if hdr.length else b""
        return hdr.type, data

    async def greet(self) -> tuple[int, int] | None:
        """Read the server greeting; returns (size, flags) for an oldstyle server, else None."""
        magic, second = p.HELLO.unpack(await recv_exact(self.sock, p.HELLO.size))
        if magic != p.NBDMAGIC:
            raise ProtocolError(f"bad server magic {magic:#x}: not an NBD server")
        if second == p.OLDSTYLE_MAGIC:
            size, flags = p.OLDSTYLE_TAIL.unpack(await recv_exact(self.sock, p.OLDSTYLE_TAIL.size))
            return size, flags & 0xFFFF
        if second != p.IHAVEOPT:
            raise ProtocolError(f"bad server magic {second:#x} after NBDMAGIC")
        (hflags,) = p.HANDSHAKE_FLAGS.unpack(await recv_exact(self.sock, 2))
        self.fixed = bool(hflags & p.HandshakeFlag.FIXED_NEWSTYLE)
        self.no_zeroes = bool(hflags & p.HandshakeFlag.NO_ZEROES)
        cflags = (p.ClientFlag.FIXED_NEWSTYLE if self.fixed else 0) | (p.ClientFlag.NO_ZEROES if self.no_zeroes else 0)
        await self.loop.sock_sendall(self.sock, p.CLIENT_FLAGS.pack(cflags))
        return None

    def refusal(self, what: str, rtype: int, data: bytes) -> HandshakeError:
        msg = data.decode(errors="replace")
        if rtype == Rep.ERR_UNKNOWN:
            text = "Requested export not available"
        elif rtype == Rep.ERR_POLICY:
            text = f"{what}: server refused it by policy"
        elif rtype == Rep.ERR_TLS_REQD:
            text = "Server requires TLS, which this client does not support yet"
        elif rtype == Rep.ERR_SHUTDOWN:
            text = "Server shutting down"
        else:
            text = f"{what} failed: {p.rep_name(rtype)}"
        return HandshakeError(f"{text}\nserver reported: {msg}" if msg else text)

    async def structured_reply(self) -> bool:
        await self.send_option(Opt.STRUCTURED_REPLY)
        rtype, _ = await self.reply(Opt.STRUCTURED_REPLY)
        if rtype == Rep.ACK:
            return True
        if p.rep_is_error(rtype):
            return False
        raise ProtocolError(f"unexpected reply {p.rep_name(rtype)} to NBD_OPT_STRUCTURED_REPLY")

    async def set_meta_context(self, export: str, queries: Sequence[str]) -> dict[str, int]:
        await self.send_option(Opt.SET_META_CONTEXT, p.encode_meta_context_request(export, list(queries)))
        contexts: dict[str, int] = {}
        while True:
            rtype, data = await self.reply(Opt.SET_META_CONTEXT)
            if rtype == Rep.ACK:
                return contexts
            if p.rep_is_error(rtype):
                return {}
            if rtype != Rep.META_CONTEXT:
                raise ProtocolError(f"unexpected reply {p.rep_name(rtype)} to NBD_OPT_SET_META_CONTEXT")
            ctx, name = p.decode_meta_context_reply(data)
            if name not in queries:
                raise ProtocolError(f"server selected meta context '{name}' that was not asked for")
            contexts[name] = ctx

    async def go(self, export: str) -> ExportInfo | None:
        """NBD_OPT_GO; None when the server does not know the option (use EXPORT_NAME)."""
        await self.send_option(Opt.GO, p.encode_info_go(export, [Info.BLOCK_SIZE]))
        size = tflags = None
        block = (0, 0, 0)
        name, desc = export, ""
        while True:
            rtype, data = await self.reply(Opt.GO)
            if rtype == Rep.ACK:
                break
            if rtype == Rep.ERR_UNSUP:
                return None
            if p.rep_is_error(rtype):
                raise self.refusal(f"Export '{export}'", rtype, data)
            if rtype != Rep.INFO:
                raise ProtocolError(f"unexpected reply {p.rep_name(rtype)} to NBD_OPT_GO")
            if len(data) < 2:
                raise ProtocolError("NBD_REP_INFO without an information type")
            (itype,) = p.U16.unpack_from(data)
            if itype == Info.EXPORT:
                if len(data) != p.INFO_EXPORT.size:
                    raise ProtocolError(f"NBD_INFO_EXPORT of {len(data)} bytes, expected {p.INFO_EXPORT.size}")
                _, size, tflags = p.INFO_EXPORT.unpack(data)
            elif itype == Info.BLOCK_SIZE:
                if len(data) != p.INFO_BLOCK_SIZE.size:
                    raise ProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes, expected 14")
                block = p.INFO_BLOCK_SIZE.unpack(data)[1:]
                check_block_sizes(*block)
            elif itype == Info.NAME:
                name = data[2:].decode(errors="replace")
            elif itype == Info.DESCRIPTION:
                desc = data[2:].decode(errors="replace")
            # Other information types are optional for a client to understand: ignored.
        if size is None:
            raise ProtocolError("server finished NBD_OPT_GO without sending NBD_INFO_EXPORT")
        return ExportInfo(name, size, TransmissionFlag(tflags), *block, description=desc)

    async def export_name(self, export: str) -> ExportInfo:
        await self.send_option(Opt.EXPORT_NAME, export.encode())
        try:
            size, tflags = p.EXPORT_NAME_REPLY.unpack(await recv_exact(self.sock, p.EXPORT_NAME_REPLY.size))
        except ConnectionResetError:
            raise HandshakeError("Requested export not available") from None
        if not self.no_zeroes:
            await recv_exact(self.sock, p.EXPORT_NAME_PAD)
        return ExportInfo(export, size, TransmissionFlag(tflags))

    async def list(self) -> list[tuple[str, str]]:
        await self.send_option(Opt.LIST)
        out = []
        while True:
            rtype, data = await self.reply(Opt.LIST)
            if rtype == Rep.ACK:
                return out
            if p.rep_is_error(rtype):
                raise self.refusal("Listing exports", rtype, data)
            if rtype != Rep.SERVER:
                raise ProtocolError(f"unexpected reply {p.rep_name(rtype)} to NBD_OPT_LIST")
            out.append(p.decode_server_reply(data))

    async def abort(self) -> None:
        """Politely end the handshake (NBD_OPT_ABORT); the server's ACK is optional."""
        try:
            await self.send_option(Opt.ABORT)
        except OSError:
            pass


def check_block_sizes(minimum: int, preferred: int, maximum: int) -> None:
    if not (minimum and minimum & (minimum - 1) == 0 and minimum <= 65536):
        raise ProtocolError(f"server's minimum block size {minimum} is not a power of 2 up to 64 KiB")
    if not (preferred >= max(minimum, 512) and preferred & (preferred - 1) == 0):
        raise ProtocolError(f"server's preferred block size {preferred} is invalid")
    if maximum < minimum or (maximum != 0xFFFFFFFF and maximum % minimum):
        raise ProtocolError(f"server's maximum block size {maximum} is invalid")


async def handshake(sock: socket.socket, export: str, contexts: Sequence[str] = ()) -> ExportInfo:
    """Negotiate an export on a fresh connection and enter the transmission phase."""
    neg = _Negotiator(sock)
    old = await neg.greet()
    if old is not None:
        return ExportInfo(export, old[0], TransmissionFlag(old[1]))
    if not neg.fixed:
        return await neg.export_name(export)
    structured = await neg.structured_reply()
    selected: dict[str, int] = {}
    if structured and contexts:
        selected = await neg.set_meta_context(export, contexts)
    info = await neg.go(export)
    if info is None:
        info = await neg.export_name(export)
    if not info.flags & TransmissionFlag.HAS_FLAGS:
        info = attrs.evolve(info, flags=TransmissionFlag.HAS_FLAGS)  # no flags at all: nothing optional
    return attrs.evolve(info, structured=structured, contexts=selected)


async def list_exports(addr: Address) -> list[tuple[str, str]]:
    """The (name, description) of every export a server lists (NBD_OPT_LIST), as ``qemu-nbd -L``."""
    sock = await connect(addr)
    try:
        neg = _Negotiator(sock)
        if await neg.greet() is not None or not neg.fixed:
            raise HandshakeError("server does not support listing exports (not fixed newstyle)")
        exports = await neg.list()
        await neg.abort()
        return exports
    finally:
        sock.close()
