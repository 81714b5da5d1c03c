"""The transmission phase of one client: read requests, run each as a task, send replies.

One reader loop takes requests off the socket; each becomes a task, at most
``MAX_REQUESTS`` (and about ``MAX_IN_FLIGHT_BYTES`` of buffers) per connection,
after which the reader stops reading and TCP pushes back on the client. Each
reply is queued whole on the channel (so replies never interleave), data as a
memoryview of the read buffer; the channel's queue is the write lock. A request the
server cannot parse drops this client only; requests already running finish
(so the image never sees half a request) and their replies go nowhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from blockgraph.driver import ReqFlags
from blockgraph.errors import BlockGraphError, BlockIOError, NotSupported

from . import protocol as P
from .server_io import HIGH_WATER, PeerGone

if TYPE_CHECKING:
    from .server_export import NbdExport
    from .server_handshake import Agreed
    from .server_io import Channel

Cmd, CF = P.Cmd, P.CmdFlag
# Plain ints on the request path: IntFlag/IntEnum operations cost about a microsecond each.
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = (
    int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.FLUSH), int(Cmd.TRIM), int(Cmd.CACHE),
    int(Cmd.WRITE_ZEROES), int(Cmd.BLOCK_STATUS))
F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO = (int(CF.FUA), int(CF.NO_HOLE), int(CF.DF), int(CF.REQ_ONE),
                                                  int(CF.FAST_ZERO))
DONE = int(P.ReplyFlag.DONE)
VALID_FLAGS = {READ: F_FUA | F_DF, WRITE_ZEROES: F_FUA | F_NO_HOLE | F_FAST_ZERO, BLOCK_STATUS: F_FUA | F_REQ_ONE}
MAX_REQUESTS = 64
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
CACHE_CHUNK = 4 * 1024 * 1024
# Smaller reads go out as one data chunk: a hole chunk would save at most this many zero bytes on the
# wire and costs a block-status walk per request (qemu-nbd walks always; nbdkit never sends holes).
SPARSE_READ_MIN = 64 * 1024
_NAMES = {c.value: f"NBD_CMD_{c.name}" for c in Cmd}


class RequestError(Exception):
    """Refuse one request with an NBD error; the connection goes on."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.err, self.message = err, message


class Connection:
    def __init__(self, ch: Channel, agreed: Agreed, log: Any = None) -> None:
        self.ch = ch
        self.exp: NbdExport = agreed.export
        self.structured = agreed.structured
        self.contexts = agreed.contexts
        self.log = log
        self.tasks: set[asyncio.Task] = set()
        self._slots = asyncio.Semaphore(MAX_REQUESTS)
        self._bytes = 0
        self._bytes_freed = asyncio.Event()

    # ------------------------------------------------------------ the reader

    async def run(self) -> None:
        """Serve until NBD_CMD_DISC, end of stream or a protocol error; in-flight requests finish first."""
        try:
            await self._read_loop()
        except PeerGone:
            pass
        except P.ProtocolError as e:
            if self.log:
                self.log.warning("nbd_client_dropped", reason=str(e))
            self.ch.abort()
        finally:
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            with contextlib.suppress(PeerGone):
                await self.ch.drain()

    async def _read_loop(self) -> None:
        while True:
            await self._slots.acquire()
            req = P.decode_request(await self.ch.recv_exactly(P.REQUEST.size))
            payload = None
            if req.type == WRITE:
                if req.length > P.MAX_BUFFER:
                    raise P.ProtocolError(f"len ({req.length}) is larger than max len ({P.MAX_BUFFER})")
                await self._reserve(req.length)
                payload = memoryview(bytearray(req.length))
                await self.ch.recv_into(payload)
            elif req.type == DISC:
                self._slots.release()
                return
            elif req.type == READ and req.length <= P.MAX_BUFFER:
                await self._reserve(req.length)
            task = asyncio.create_task(self._serve(req, payload))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _reserve(self, n: int) -> None:
        while self._bytes and self._bytes + n > MAX_IN_FLIGHT_BYTES:
            self._bytes_freed.clear()
            await self._bytes_freed.wait()
        self._bytes += n

    def _release(self, req: P.Request) -> None:
        if (req.type == READ or req.type == WRITE) and req.length <= P.MAX_BUFFER:
            self._bytes -= req.length
            self._bytes_freed.set()
        self._slots.release()

    # ------------------------------------------------------------ one request

    async def _serve(self, req: P.Request, payload: memoryview | None) -> None:
        try:
            try:
                self._check(req)
                await self._dispatch(req, payload)
            except RequestError as e:
                await self._error(req, e.err, e.message)
            except NotSupported as e:
                await self._error(req, P.NBD_ENOTSUP, str(e))
            except BlockIOError as e:
                await self._error(req, P.errno_to_nbd(e.errno), str(e))
            except BlockGraphError as e:
                await self._error(req, P.NBD_EIO, str(e))
        except PeerGone:
            self.ch.abort()
        finally:
            self._release(req)

    def _check(self, req: P.Request) -> None:
        """QEMU's nbd_co_receive_request checks, after the payload has been read."""
        t, exp = req.type, self.exp
        name = _NAMES.get(t)
        if name is None:
            raise RequestError(P.NBD_EINVAL, f"invalid request type ({t}) received")
        valid = VALID_FLAGS.get(t, F_FUA) if t != READ or self.structured else F_FUA
        if req.flags & ~valid:
            raise RequestError(P.NBD_EINVAL, f"unsupported flags for command {name} (got 0x{req.flags:x})")
        if t == READ and req.length > P.MAX_BUFFER:
            raise RequestError(P.NBD_EINVAL, f"len ({req.length}) is larger than max len ({P.MAX_BUFFER})")
        if (t == WRITE or t == WRITE_ZEROES or t == TRIM) and not exp.writable:
            raise RequestError(P.NBD_EPERM, "Export is read-only")
        if t == Cmd.RESIZE:
            raise RequestError(P.NBD_EINVAL, f"invalid request type ({t}) received")
        size = exp.size()
        if t != FLUSH and (req.offset > size or req.length > size - req.offset):
            err = P.NBD_ENOSPC if t == WRITE or t == WRITE_ZEROES else P.NBD_EINVAL
            raise RequestError(err, f"operation past EOF; From: {req.offset}, Len: {req.length}, Size: {size}")
        if t == BLOCK_STATUS:
            if not self.contexts:
                raise RequestError(P.NBD_EINVAL, "CMD_BLOCK_STATUS not negotiated")
            if not req.length:
                raise RequestError(P.NBD_EINVAL, "need non-zero length")

    async def _dispatch(self, req: P.Request, payload: memoryview | None) -> None:
        t, blk = req.type, self.exp.blk
        fua = ReqFlags.FUA if req.flags & F_FUA else ReqFlags.NONE
        if t == READ:
            await self._read(req)
            return
        if t == WRITE:
            await blk.pwritev(req.offset, payload, fua)
        elif t == FLUSH:
            await blk.flush()
        elif t == TRIM:
            await blk.pdiscard(req.offset, req.length)
            if fua:
                await blk.flush()
        elif t == WRITE_ZEROES:
            flags = fua
            if not req.flags & F_NO_HOLE:
                flags |= ReqFlags.MAY_UNMAP
            if req.flags & F_FAST_ZERO:
                flags |= ReqFlags.NO_FALLBACK
            await blk.pwrite_zeroes(req.offset, req.length, flags)
        elif t == CACHE:
            await self._cache(req)
        elif t == BLOCK_STATUS:
            await self._block_status(req)
            return
        await self._send([P.encode_simple_reply(req.cookie)])

    async def _read(self, req: P.Request) -> None:
        blk, n = self.exp.blk, req.length
        if not self.structured:
            buf = memoryview(bytearray(n))
            await blk.preadv(req.offset, buf)
            await self._send([P.encode_simple_reply(req.cookie), buf])
            return
        if not n:
            await self._send([P.encode_chunk_header(req.cookie, P.ReplyType.NONE, 0, DONE)])
            return
        if req.flags & F_DF or n < SPARSE_READ_MIN:
            pieces = [(req.offset, n, False)]
        else:
            pieces = await self.exp.read_map(req.offset, n)
        buf = memoryview(bytearray(sum(m for _, m, zero in pieces if not zero))) if pieces else memoryview(b"")
        out: list[Any] = []
        pos = 0
        for i, (off, m, zero) in enumerate(pieces):
            done = DONE if i == len(pieces) - 1 else 0
            if zero:
                out.append(P.encode_offset_hole(req.cookie, off, m, done))
            else:
                view = buf[pos:pos + m]
                pos += m
                await blk.preadv(off, view)
                out += [P.encode_offset_data_header(req.cookie, off, m, done), view]
        await self._send(out)

    async def _cache(self, req: P.Request) -> None:
        """Prefetch: read the range and drop it (qemu-nbd reads with BDRV_REQ_PREFETCH)."""
        scratch = memoryview(bytearray(min(req.length, CACHE_CHUNK)))
        for pos in range(req.offset, req.offset + req.length, CACHE_CHUNK):
            m = min(CACHE_CHUNK, req.offset + req.length - pos)
            await self.exp.blk.preadv(pos, scratch[:m])
            await asyncio.sleep(0)  # page-cache reads complete inline: let the other clients in

    async def _block_status(self, req: P.Request) -> None:
        one = bool(req.flags & F_REQ_ONE)
        out = []
        for i, (cid, _name) in enumerate(self.contexts):
            extents = await self.exp.extents(cid, req.offset, req.length, one)
            if not extents:
                raise RequestError(P.NBD_EINVAL, f"no block status at offset {req.offset}")
            done = DONE if i == len(self.contexts) - 1 else 0
            out.append(P.encode_block_status(req.cookie, cid, extents, done))
        await self._send(out)

    # ------------------------------------------------------------ replies

    async def _error(self, req: P.Request, err: int, message: str) -> None:
        if self.log:
            self.log.debug("nbd_request_failed", cmd=_NAMES.get(req.type, req.type), error=err, reason=message)
        if self.structured:
            await self._send([P.encode_error_chunk(req.cookie, err, message)])
        else:
            await self._send([P.encode_simple_reply(req.cookie, err)])

    async def _send(self, bufs: list[Any]) -> None:
        """Queue one reply whole (its chunks stay together); wait only when the peer lags behind."""
        ch = self.ch
        ch.queue(bufs)
        if ch.queued > HIGH_WATER:
            await ch.wait_room()
