"""One NBD connection in the transmission phase: many requests in flight, replies matched by cookie.

The socket stays registered with the event loop for reading; each wake-up reads what is there and
parses every complete reply (one system call for a burst of small replies). A large read payload is
received straight into the caller's buffer (``recv_into``), never through an intermediate copy.
Requests queued in one loop iteration leave in one ``sendmsg`` (scatter-gather: write payloads are
not copied either).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections import deque
from collections.abc import Callable

from . import protocol as p
from .client_handshake import ExportInfo
from .protocol import Cmd, ProtocolError, ReplyFlag, ReplyType

READ_AHEAD = 256 * 1024
DIRECT_MIN = 32 * 1024  # payload still missing beyond this is received directly into its destination
MAX_META_CHUNK = 4 + 8 * (1 << 20)  # a block status chunk carries at most 2^20 extents
MAX_ERROR_CHUNK = p.ERROR_CHUNK.size + p.MAX_STRING + 8
MAX_IOV = 512
_ZEROS = bytes(1 << 20)


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

    def __init__(self, fut: asyncio.Future, cmd: int, offset: int, length: int, buf: memoryview | None) -> None:
        self.fut, self.cmd, self.offset, self.length, self.buf = fut, cmd, offset, length, buf
        self.covered = 0
        self.error: ServerError | None = None
        self.extents: dict[str, list[tuple[int, int]]] = {}  # meta context name -> extents


class Connection:
    def __init__(self, sock: socket.socket, info: ExportInfo,
                 on_broken: Callable[[Connection], None] | None = None) -> None:
        self.sock, self.info, self.on_broken = sock, info, on_broken
        self.fd = sock.fileno()
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, Pending] = {}
        self.cookie = 0
        self.broken: BaseException | None = None
        self.context_names = {ctx: name for name, ctx in info.contexts.items()}
        # receiving
        self.rbuf = bytearray(READ_AHEAD)
        self.rview = memoryview(self.rbuf)
        self.rpos = self.rend = 0
        self.dest: memoryview | None = None  # where the payload being received goes
        self.dest_pos = 0
        self.dest_done: Callable[[], None] | None = None
        # sending
        self.wqueue: deque[memoryview] = deque()
        self.flush_scheduled = self.writing = False
        self.drained: asyncio.Event | None = None
        self.loop.add_reader(self.fd, self._on_readable)

    # -------------------------------------------------------------- requests

    async def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                      payload: memoryview | None = None, buf: memoryview | None = None) -> Pending:
        """Send one request and wait for its whole reply."""
        if self.broken is not None:
            raise ConnectionLost(str(self.broken))
        self.cookie += 1
        req = Pending(self.loop.create_future(), cmd, offset, length, buf)
        self.pending[self.cookie] = req
        self._queue(memoryview(p.encode_request(cmd, self.cookie, offset, length, flags)))
        if payload is not None:
            self._queue(payload if payload.format == "B" else payload.cast("B"))  # byte counts in _flush
        return await req.fut

    def _queue(self, data: memoryview) -> None:
        self.wqueue.append(data)
        if not self.flush_scheduled and not self.writing:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.broken is not None:
            return
        q = self.wqueue
        while q:
            batch = [q[i] for i in range(min(len(q), MAX_IOV))]
            try:
                sent = self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.fail(ConnectionLost(f"sending to the NBD server failed: {e.strerror or e}"))
                return
            while sent:
                head = q[0]
                if sent >= len(head):
                    sent -= len(head)
                    q.popleft()
                else:
                    q[0] = head[sent:]
                    sent = 0
            if q and len(batch) < MAX_IOV:
                break  # the socket is full: wait until it is writable
        if q and not self.writing:
            self.loop.add_writer(self.fd, self._flush)
            self.writing = True
        elif not q:
            if self.writing:
                self.loop.remove_writer(self.fd)
                self.writing = False
            if self.drained is not None:
                self.drained.set()

    async def disconnect(self) -> None:
        """NBD_CMD_DISC (no reply), sent after everything queued, then close."""
        if self.broken is None:
            self.drained = asyncio.Event()
            self._queue(memoryview(p.encode_request(Cmd.DISC, 0)))
            try:
                await asyncio.wait_for(self.drained.wait(), 5)
            except TimeoutError:
                pass
        self.fail(ConnectionLost("NBD connection closed"), notify=False)

    def fail(self, exc: BaseException, *, notify: bool = True) -> None:
        """Break the connection: every request in flight fails with a copy of ``exc``."""
        first = self.broken is None
        if first:
            self.broken = exc
            self.loop.remove_reader(self.fd)
            if self.writing:
                self.loop.remove_writer(self.fd)
                self.writing = False
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            self.wqueue.clear()
            if self.drained is not None:
                self.drained.set()
        pending, self.pending = self.pending, {}
        for req in pending.values():
            if not req.fut.done():
                req.fut.set_exception(type(exc)(*exc.args))
        if first and notify and self.on_broken is not None:
            self.on_broken(self)

    # -------------------------------------------------------------- receiving

    def _on_readable(self) -> None:
        try:
            dest = self.dest
            if dest is not None and self.rpos == self.rend and len(dest) - self.dest_pos >= DIRECT_MIN:
                n = self.sock.recv_into(dest[self.dest_pos:])
                self.dest_pos += n
            else:
                if self.rpos == self.rend:
                    self.rpos = self.rend = 0
                elif len(self.rbuf) - self.rend < 4096:
                    have = self.rend - self.rpos
                    self.rview[:have] = self.rview[self.rpos:self.rend]
                    self.rpos, self.rend = 0, have
                n = self.sock.recv_into(self.rview[self.rend:])
                self.rend += n
            if not n:
                midway = " in the middle of a reply" if self.rend > self.rpos or self.dest is not None else ""
                raise ConnectionLost(f"NBD server closed the connection{midway}")
            self._process()
        except (BlockingIOError, InterruptedError):
            return
        except ProtocolError as e:
            self.fail(ConnectionLost(f"NBD server broke the protocol: {e}"))
        except ConnectionLost as e:
            self.fail(e)
        except OSError as e:
            self.fail(ConnectionLost(f"NBD connection failed: {e.strerror or e}"))

    def _process(self) -> None:
        """Consume every complete piece of input; stops when more bytes are needed."""
        rbuf = self.rbuf
        while True:
            dest = self.dest
            if dest is not None:
                need = len(dest) - self.dest_pos
                if need:
                    take = min(need, self.rend - self.rpos)
                    if take:
                        dest[self.dest_pos:self.dest_pos + take] = self.rview[self.rpos:self.rpos + take]
                        self.rpos += take
                        self.dest_pos += take
                    if take < need:
                        return
                done, self.dest, self.dest_done = self.dest_done, None, None
                done()
                continue
            avail = self.rend - self.rpos
            if avail < 4:
                return
            (magic,) = p.REPLY_MAGIC.unpack_from(rbuf, self.rpos)
            if magic == p.SIMPLE_REPLY_MAGIC:
                if avail < p.SIMPLE_REPLY.size:
                    return
                _, err, cookie = p.SIMPLE_REPLY.unpack_from(rbuf, self.rpos)
                self.rpos += p.SIMPLE_REPLY.size
                self._simple(cookie, err)
            elif magic == p.STRUCTURED_REPLY_MAGIC:
                if avail < p.STRUCTURED_REPLY.size:
                    return
                _, flags, rtype, cookie, length = p.STRUCTURED_REPLY.unpack_from(rbuf, self.rpos)
                self.rpos += p.STRUCTURED_REPLY.size
                self._chunk(p.ChunkHeader(flags, rtype, cookie, length))
            else:
                raise ProtocolError(f"bad reply magic {magic:#x}")

    def _expect(self, dest: memoryview, done: Callable[[], None]) -> None:
        """The next ``len(dest)`` bytes of input go to ``dest``; then ``done()`` runs."""
        self.dest, self.dest_pos, self.dest_done = dest, 0, done

    def _with_payload(self, n: int, use: Callable[[memoryview], None]) -> None:
        """Call ``use`` with the next ``n`` bytes: from the read-ahead buffer when all there, else once they came."""
        if self.rend - self.rpos >= n:
            view = self.rview[self.rpos:self.rpos + n]
            self.rpos += n
            use(view)
            return
        tmp = memoryview(bytearray(n))
        self._expect(tmp, lambda: use(tmp))

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

    @staticmethod
    def _dest(req: Pending, start: int, n: int) -> memoryview:
        """Where payload goes: the caller's buffer, or scratch once the caller was cancelled (it may reuse it)."""
        if req.fut.done():
            return memoryview(bytearray(n))
        return req.buf[start:start + n]

    def _simple(self, cookie: int, err: int) -> None:
        req = self._lookup(cookie)
        if err:
            self._finish(cookie, req, ServerError(p.errno_from_nbd(err)))
        elif req.cmd == Cmd.READ:
            if self.info.structured:
                raise ProtocolError("simple reply to a read after structured replies were negotiated")
            self._expect(self._dest(req, 0, req.length), lambda: self._finish(cookie, req))
        elif req.cmd == Cmd.BLOCK_STATUS:
            raise ProtocolError("simple reply to a block status request")
        else:
            self._finish(cookie, req)

    def _chunk(self, hdr: p.ChunkHeader) -> None:
        if not self.info.structured:
            raise ProtocolError("structured reply chunk although structured replies were not negotiated")
        req = self._lookup(hdr.cookie)
        rtype, length = hdr.type, hdr.length
        if rtype == ReplyType.OFFSET_DATA:
            if req.cmd != Cmd.READ:
                raise ProtocolError(f"data chunk in the reply to command {req.cmd}")
            if length <= p.OFFSET_CHUNK.size or length - p.OFFSET_CHUNK.size > req.length:
                raise ProtocolError(f"oversized or empty data chunk ({length} bytes) for a read of {req.length}")

            def data(view: memoryview) -> None:
                (off,) = p.OFFSET_CHUNK.unpack(view)
                n = length - p.OFFSET_CHUNK.size
                start = self._place(req, off, n, "data")
                req.covered += n
                self._expect(self._dest(req, start, n), lambda: self._chunk_end(hdr, req))

            self._with_payload(p.OFFSET_CHUNK.size, data)
            return
        if rtype == ReplyType.OFFSET_HOLE:
            if req.cmd != Cmd.READ or length != p.HOLE_CHUNK.size:
                raise ProtocolError(f"bad hole chunk ({length} bytes) for command {req.cmd}")
            self._with_payload(length, lambda v: self._hole(hdr, req, v))
        elif rtype == ReplyType.BLOCK_STATUS:
            if req.cmd != Cmd.BLOCK_STATUS or length > MAX_META_CHUNK:
                raise ProtocolError(f"oversized or unexpected block status chunk ({length} bytes)")
            self._with_payload(length, lambda v: self._status(hdr, req, v))
        elif p.reply_type_is_error(rtype):
            if length > MAX_ERROR_CHUNK:
                raise ProtocolError(f"oversized error chunk ({length} bytes)")
            self._with_payload(length, lambda v: self._error(hdr, req, v))
        elif rtype == ReplyType.NONE:
            if length or not hdr.flags & ReplyFlag.DONE:
                raise ProtocolError("NBD_REPLY_TYPE_NONE chunk with a payload or without the DONE flag")
            self._chunk_end(hdr, req)
        else:
            raise ProtocolError(f"unknown reply chunk type {rtype}")

    def _hole(self, hdr: p.ChunkHeader, req: Pending, view: memoryview) -> None:
        off, n = p.HOLE_CHUNK.unpack(view)
        start = self._place(req, off, n, "hole")
        if not req.fut.done():
            for pos in range(start, start + n, len(_ZEROS)):
                step = min(len(_ZEROS), start + n - pos)
                req.buf[pos:pos + step] = _ZEROS[:step]
        req.covered += n
        self._chunk_end(hdr, req)

    def _status(self, hdr: p.ChunkHeader, req: Pending, view: memoryview) -> None:
        ctx, extents = p.decode_block_status(view)
        name = self.context_names.get(ctx)
        if name is None:
            raise ProtocolError(f"block status for meta context id {ctx}, which was not negotiated")
        if name in req.extents:
            raise ProtocolError(f"two block status chunks for meta context id {ctx}")
        if any(n == 0 for n, _ in extents):
            raise ProtocolError("block status extent of length 0")
        req.extents[name] = extents  # by name: a re-sent request may meet other ids
        self._chunk_end(hdr, req)

    def _error(self, hdr: p.ChunkHeader, req: Pending, view: memoryview) -> None:
        if hdr.type in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            err, msg, off = p.decode_error_chunk(hdr.type, view)
            if off is not None and not req.offset <= off < req.offset + max(req.length, 1):
                raise ProtocolError(f"error offset {off} outside the request")
            error = ServerError(p.errno_from_nbd(err), msg)
        else:
            error = ServerError(errno.EINVAL, f"unknown error chunk type {hdr.type:#x}")
        if req.error is None:
            req.error = error
        self._chunk_end(hdr, req)

    def _chunk_end(self, hdr: p.ChunkHeader, req: Pending) -> None:
        if not hdr.flags & ReplyFlag.DONE:
            return
        problem = None if req.error is not None else self._incomplete(req)
        self._finish(hdr.cookie, req, ReplyError(problem) if problem else None)

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
