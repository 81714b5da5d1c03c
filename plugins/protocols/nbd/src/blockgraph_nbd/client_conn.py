"""One NBD connection in the transmission phase: many requests in flight, one reader matching replies by cookie.

Read payloads go straight from the socket into the caller's buffer (``sock_recv_into``) once
the bytes already buffered are used up; small replies are parsed from one read-ahead buffer
so a burst of small replies costs one system call.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct

from . import protocol as p
from .client_handshake import ExportInfo
from .protocol import Cmd, ProtocolError, ReplyFlag, ReplyType

READ_AHEAD = 256 * 1024
DIRECT_MIN = 64 * 1024  # payloads this much larger than what is buffered skip the read-ahead buffer
MAX_META_CHUNK = 4 + 8 * (1 << 20)  # a block status chunk carries at most 2^20 extents
MAX_ERROR_CHUNK = p.ERROR_CHUNK.size + p.MAX_STRING + 8
_ZEROS = bytes(1 << 20)
_SIMPLE_TAIL = struct.Struct(">IQ")  # a simple reply after its magic: error, cookie
_CHUNK_TAIL = struct.Struct(">HHQI")  # a chunk header after its magic: flags, type, cookie, length


class ConnectionLost(Exception):
    """The connection broke before the reply arrived; the request may be sent again elsewhere."""


class ServerError(Exception):
    """The server answered the request with an error."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno, self.message = err, message


class ReplyError(Exception):
    """The reply to this one request was wrong (EIO); the connection itself is still in step."""


class Pending:
    __slots__ = ("buf", "cmd", "covered", "error", "extents", "fut", "length", "offset")

    def __init__(self, cmd: int, offset: int, length: int, buf: memoryview | None) -> None:
        self.cmd, self.offset, self.length, self.buf = cmd, offset, length, buf
        self.fut: asyncio.Future[Pending] = asyncio.get_running_loop().create_future()
        self.covered = 0
        self.error: ServerError | None = None
        self.extents: dict[int, list[tuple[int, int]]] = {}


class Connection:
    def __init__(self, sock: socket.socket, info: ExportInfo) -> None:
        self.sock, self.info = sock, info
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, Pending] = {}
        self.cookie = 0
        self.send_lock = asyncio.Lock()
        self.broken: BaseException | None = None
        self.rbuf = bytearray(READ_AHEAD)
        self.rview = memoryview(self.rbuf)
        self.rpos = self.rend = 0
        self.context_ids = set(info.contexts.values())
        self.reader = self.loop.create_task(self._read_loop())

    # -------------------------------------------------------------- requests

    async def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                      payload: memoryview | None = None, buf: memoryview | None = None) -> Pending:
        """Send one request and wait for its whole reply."""
        if self.broken is not None:
            raise ConnectionLost(str(self.broken))
        self.cookie += 1
        cookie = self.cookie
        req = Pending(cmd, offset, length, buf)
        self.pending[cookie] = req
        header = p.encode_request(cmd, cookie, offset, length, flags)
        try:
            async with self.send_lock:
                if self.broken is not None:
                    self.pending.pop(cookie, None)
                    raise ConnectionLost(str(self.broken))
                sender = asyncio.ensure_future(self._send(header, payload))
                # A cancelled caller must not leave half a request on the wire: the send finishes regardless.
                await asyncio.shield(sender)
        except OSError as e:
            self.fail(ConnectionLost(f"sending to the NBD server failed: {e.strerror or e}"))
        return await req.fut

    async def _send(self, header: bytes, payload: memoryview | None) -> None:
        if payload is None:
            await self.loop.sock_sendall(self.sock, header)
        elif len(payload) <= 16384:
            await self.loop.sock_sendall(self.sock, header + bytes(payload))
        else:
            await self.loop.sock_sendall(self.sock, header)
            await self.loop.sock_sendall(self.sock, payload)

    async def disconnect(self) -> None:
        """NBD_CMD_DISC (no reply), then close."""
        if self.broken is None:
            try:
                async with self.send_lock:
                    await asyncio.wait_for(self.loop.sock_sendall(self.sock, p.encode_request(Cmd.DISC, 0)), 5)
            except (TimeoutError, OSError):
                pass
        self.fail(ConnectionLost("NBD connection closed"))
        await asyncio.wait([self.reader])

    def fail(self, exc: BaseException) -> None:
        """Break the connection: every request in flight fails with a copy of ``exc``."""
        if self.broken is None:
            self.broken = exc
        pending, self.pending = self.pending, {}
        for req in pending.values():
            if not req.fut.done():
                req.fut.set_exception(type(exc)(*exc.args))
        if not self.reader.done() and asyncio.current_task() is not self.reader:
            self.reader.cancel()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    # -------------------------------------------------------------- receiving

    async def _fill(self, n: int) -> memoryview:
        """At least ``n`` buffered bytes; returns a view of them and consumes them."""
        while self.rend - self.rpos < n:
            if self.rpos and (len(self.rbuf) - self.rpos < n or self.rpos == self.rend):
                have = self.rend - self.rpos
                self.rview[:have] = self.rview[self.rpos:self.rend]
                self.rpos, self.rend = 0, have
            got = await self.loop.sock_recv_into(self.sock, self.rview[self.rend:])
            if not got:
                raise ConnectionLost("NBD server closed the connection" + (
                    " in the middle of a reply" if self.rend > self.rpos else ""))
            self.rend += got
        view = self.rview[self.rpos:self.rpos + n]
        self.rpos += n
        return view

    async def _read_into(self, dest: memoryview) -> None:
        n = len(dest)
        have = self.rend - self.rpos
        if n - have < DIRECT_MIN and n <= len(self.rbuf):
            dest[:] = await self._fill(n)
            return
        take = min(have, n)
        dest[:take] = self.rview[self.rpos:self.rpos + take]
        self.rpos += take
        pos = take
        while pos < n:
            got = await self.loop.sock_recv_into(self.sock, dest[pos:])
            if not got:
                raise ConnectionLost("NBD server closed the connection in the middle of a reply")
            pos += got

    async def _read_loop(self) -> None:
        try:
            while True:
                head = await self._fill(4)
                (magic,) = p.REPLY_MAGIC.unpack(head)
                if magic == p.SIMPLE_REPLY_MAGIC:
                    err, cookie = _SIMPLE_TAIL.unpack(await self._fill(_SIMPLE_TAIL.size))
                    await self._simple(cookie, err)
                elif magic == p.STRUCTURED_REPLY_MAGIC:
                    await self._chunk(p.ChunkHeader(*_CHUNK_TAIL.unpack(await self._fill(_CHUNK_TAIL.size))))
                else:
                    raise ProtocolError(f"bad reply magic {magic:#x}")
        except asyncio.CancelledError:
            raise
        except ProtocolError as e:
            self.fail(ConnectionLost(f"NBD server broke the protocol: {e}"))
        except ConnectionLost as e:
            self.fail(e)
        except OSError as e:
            self.fail(ConnectionLost(f"NBD connection failed: {e.strerror or e}"))

    def _lookup(self, cookie: int) -> Pending:
        req = self.pending.get(cookie)
        if req is None:
            raise ProtocolError(f"reply for unknown handle {cookie:#x}")
        return req

    def _finish(self, cookie: int, req: Pending, exc: BaseException | None = None) -> None:
        del self.pending[cookie]
        if req.fut.done():
            return  # the caller went away
        if exc is not None:
            req.fut.set_exception(exc)
        elif req.error is not None:
            req.fut.set_exception(req.error)
        else:
            req.fut.set_result(req)

    async def _simple(self, cookie: int, err: int) -> None:
        req = self._lookup(cookie)
        if err:
            self._finish(cookie, req, ServerError(p.errno_from_nbd(err)))
            return
        if req.cmd == Cmd.READ:
            if self.info.structured:
                raise ProtocolError("simple reply to a read after structured replies were negotiated")
            await self._read_into(self._dest(req, 0, req.length))
        elif req.cmd == Cmd.BLOCK_STATUS:
            raise ProtocolError("simple reply to a block status request")
        self._finish(cookie, req)

    async def _chunk(self, hdr: p.ChunkHeader) -> None:
        if not self.info.structured:
            raise ProtocolError("structured reply chunk although structured replies were not negotiated")
        req = self._lookup(hdr.cookie)
        rtype, length = hdr.type, hdr.length
        problem: str | None = None
        if rtype == ReplyType.OFFSET_DATA:
            if req.cmd != Cmd.READ:
                raise ProtocolError(f"data chunk in the reply to command {req.cmd}")
            if length <= p.OFFSET_CHUNK.size or length - p.OFFSET_CHUNK.size > req.length:
                raise ProtocolError(f"oversized or empty data chunk ({length} bytes) for a read of {req.length}")
            (off,) = p.OFFSET_CHUNK.unpack(await self._fill(8))
            n = length - 8
            start = self._place(req, off, n, "data")
            await self._read_into(self._dest(req, start, n))
            req.covered += n
        elif rtype == ReplyType.OFFSET_HOLE:
            if req.cmd != Cmd.READ or length != p.HOLE_CHUNK.size:
                raise ProtocolError(f"bad hole chunk ({length} bytes) for command {req.cmd}")
            off, n = p.HOLE_CHUNK.unpack(await self._fill(12))
            start = self._place(req, off, n, "hole")
            if not req.fut.done():
                for pos in range(start, start + n, len(_ZEROS)):
                    step = min(len(_ZEROS), start + n - pos)
                    req.buf[pos:pos + step] = _ZEROS[:step]
            req.covered += n
        elif rtype == ReplyType.BLOCK_STATUS:
            if req.cmd != Cmd.BLOCK_STATUS or length > MAX_META_CHUNK:
                raise ProtocolError(f"oversized or unexpected block status chunk ({length} bytes)")
            ctx, extents = p.decode_block_status(await self._payload(length))
            if ctx not in self.context_ids:
                raise ProtocolError(f"block status for meta context id {ctx}, which was not negotiated")
            if ctx in req.extents:
                raise ProtocolError(f"two block status chunks for meta context id {ctx}")
            if any(n == 0 for n, _ in extents):
                raise ProtocolError("block status extent of length 0")
            req.extents[ctx] = extents
        elif rtype in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            if length > MAX_ERROR_CHUNK:
                raise ProtocolError(f"oversized error chunk ({length} bytes)")
            err, msg, off = p.decode_error_chunk(rtype, await self._payload(length))
            if off is not None and not req.offset <= off < req.offset + max(req.length, 1):
                raise ProtocolError(f"error offset {off} outside the request")
            if req.error is None:
                req.error = ServerError(p.errno_from_nbd(err), msg)
        elif rtype == ReplyType.NONE:
            if length or not hdr.flags & ReplyFlag.DONE:
                raise ProtocolError("NBD_REPLY_TYPE_NONE chunk with a payload or without the DONE flag")
        elif p.reply_type_is_error(rtype):
            if length > MAX_ERROR_CHUNK:
                raise ProtocolError(f"oversized error chunk ({length} bytes)")
            await self._payload(length)
            if req.error is None:
                req.error = ServerError(errno.EINVAL, f"unknown error chunk type {rtype:#x}")
        else:
            raise ProtocolError(f"unknown reply chunk type {rtype}")
        if hdr.flags & ReplyFlag.DONE:
            if req.error is None:
                problem = self._incomplete(req)
            self._finish(hdr.cookie, req, ReplyError(problem) if problem else None)

    @staticmethod
    def _dest(req: Pending, start: int, n: int) -> memoryview:
        """Where payload goes: the caller's buffer, or scratch once the caller was cancelled (it may reuse it)."""
        if req.fut.done():
            return memoryview(bytearray(n))
        return req.buf[start:start + n]

    def _place(self, req: Pending, off: int, n: int, what: str) -> int:
        if off < req.offset or off + n > req.offset + req.length or not n:
            raise ProtocolError(f"{what} chunk [{off}, {off + n}) outside the request "
                                f"[{req.offset}, {req.offset + req.length})")
        if req.covered + n > req.length:
            raise ProtocolError("reply chunks overlap")
        return off - req.offset

    def _incomplete(self, req: Pending) -> str | None:
        if req.cmd == Cmd.READ and req.covered != req.length:
            return f"NBD server's reply covered {req.covered} of {req.length} bytes"
        if req.cmd == Cmd.BLOCK_STATUS and not req.extents:
            return "NBD server's block status reply had no extents"
        return None

    async def _payload(self, n: int) -> memoryview:
        if n <= len(self.rbuf):
            return await self._fill(n)
        out = memoryview(bytearray(n))
        await self._read_into(out)
        return out

