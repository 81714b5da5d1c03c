"""A connected socket for the server: buffered reads, gathered writes, no payload copies.

Headers come out of one receive buffer; a WRITE payload larger than what is
already buffered is received straight into its own buffer. The handshake sends
directly; in the transmission phase replies are queued (:meth:`Channel.queue`) and
everything queued in one loop iteration leaves in one ``sendmsg`` over the
callers' buffers (headers and memoryviews of the data); what the socket does not
take waits, still as memoryviews, for it to become writable. A peer that stops
reading for ``stall_timeout`` seconds is treated as gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence

RECV_BUFFER = 256 * 1024
IOV_CHUNK = 512  # buffers per sendmsg, well under IOV_MAX
HIGH_WATER = 8 * 1024 * 1024  # queued reply bytes above which repliers wait
LOW_WATER = 2 * 1024 * 1024
UNIX_SNDBUF = 4 * 1024 * 1024
SEND_NOW = 256 * 1024  # queued bytes that go out at once instead of at the end of the loop iteration


class PeerGone(Exception):
    """The peer closed the connection, reset it, or stopped reading."""


class Channel:
    def __init__(self, sock: socket.socket, *, stall_timeout: float | None = None) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif sock.family == socket.AF_UNIX:
            # TCP tunes its buffers itself; a unix socket's default (~200 KiB) holds less than one large
            # reply, so every big READ would wake us several times to push the rest.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.stall_timeout = stall_timeout
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._pos = self._end = 0
        self.closed = False
        self._out: list[bytes | bytearray | memoryview] = []
        self.queued = 0
        self._flush_handle: asyncio.Handle | None = None
        self._writer: asyncio.Task | None = None
        self._room = asyncio.Event()
        self._room.set()
        self.write_error: str | None = None

    # ------------------------------------------------------------ receiving

    async def _fill(self, need: int) -> None:
        """Make at least ``need`` (<= RECV_BUFFER) bytes available from ``_pos``."""
        while self._end - self._pos < need:
            if self._pos == self._end:
                self._pos = self._end = 0
            elif len(self._buf) - self._pos < need:
                avail = self._end - self._pos
                self._view[:avail] = self._view[self._pos:self._end]
                self._pos, self._end = 0, avail
            got = await self._recv(self._view[self._end:])
            self._end += got

    async def _recv(self, into: memoryview) -> int:
        if self.closed:
            raise PeerGone("connection closed")
        try:
            got = await self.loop.sock_recv_into(self.sock, into)
        except OSError as e:
            raise PeerGone(str(e)) from None
        if not got:
            raise PeerGone("end of stream")
        return got

    async def recv_exactly(self, n: int) -> bytes:
        if n > RECV_BUFFER:
            out = bytearray(n)
            await self.recv_into(memoryview(out))
            return bytes(out)
        if self._end - self._pos < n:
            await self._fill(n)
        data = bytes(self._view[self._pos:self._pos + n])
        self._pos += n
        return data

    async def recv_into(self, dst: memoryview) -> None:
        """Fill ``dst``: first from what is buffered, then straight from the socket."""
        have = min(self._end - self._pos, len(dst))
        if have:
            dst[:have] = self._view[self._pos:self._pos + have]
            self._pos += have
        pos = have
        while pos < len(dst):
            pos += await self._recv(dst[pos:])

    async def skip(self, n: int) -> None:
        """Read and drop ``n`` bytes (the payload of a refused WRITE)."""
        while n:
            step = min(n, RECV_BUFFER)
            await self._fill(step)
            self._pos += step
            n -= step

    # ------------------------------------------------------------ sending

    async def send(self, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send every buffer in order; callers serialise (one reply at a time)."""
        if self.closed:
            raise PeerGone("connection closed")
        for i in range(0, len(bufs), IOV_CHUNK):
            part = bufs[i:i + IOV_CHUNK]
            try:
                sent = self.sock.sendmsg(part)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                raise PeerGone(str(e)) from None
            if sent == sum(len(b) for b in part):
                continue
            await self._send_rest(part, sent)

    async def _send_rest(self, part: Sequence[bytes | bytearray | memoryview], sent: int) -> None:
        try:
            async with asyncio.timeout(self.stall_timeout):
                for b in part:
                    if sent >= len(b):
                        sent -= len(b)
                        continue
                    view = memoryview(b)[sent:] if sent else b
                    sent = 0
                    await self.loop.sock_sendall(self.sock, view)
        except TimeoutError:
            raise PeerGone(f"peer stopped reading for {self.stall_timeout:g} s") from None
        except OSError as e:
            raise PeerGone(str(e)) from None

    # ------------------------------------------------------------ queued sending

    def queue(self, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        """Queue buffers behind everything queued before. What is queued within one loop iteration
        leaves in one ``sendmsg``: with many requests in flight, replies share system calls."""
        if self.closed:
            raise PeerGone("connection closed")
        self._out.extend(bufs)
        self.queued += sum(len(b) for b in bufs)
        if self._writer is not None:
            return
        if self.queued >= SEND_NOW:  # enough for a system call of its own: the peer can start on it now
            if self._flush_handle is not None:
                self._flush_handle.cancel()
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    async def wait_room(self) -> None:
        """Wait while more than HIGH_WATER bytes are queued (the peer reads slower than we reply)."""
        while self.queued > HIGH_WATER and not self.closed:
            self._room.clear()
            await self._room.wait()
        if self.closed:
            raise PeerGone("connection closed")

    async def drain(self) -> None:
        """Wait until everything queued went out (or the connection failed)."""
        while self.queued and not self.closed:
            self._room.clear()
            await self._room.wait()

    def _send_queued(self) -> bool:
        """Hand the kernel what it takes; True once the queue is empty."""
        while self._out:
            part = self._out[:IOV_CHUNK]
            try:
                sent = self.sock.sendmsg(part)
            except (BlockingIOError, InterruptedError):
                return False
            if self._consume(sent) < len(part):  # the socket buffer is full
                return False
        return True

    def _consume(self, n: int) -> int:
        """Drop ``n`` sent bytes from the queue; returns how many whole buffers went out."""
        out = self._out
        self.queued -= n
        i = 0
        while n:
            size = len(out[i])
            if n >= size:
                n -= size
                i += 1
            else:
                out[i] = memoryview(out[i])[n:]  # the rest of a partly sent buffer, not a copy
                n = 0
        del out[:i]
        if self.queued <= LOW_WATER or not out:
            self._room.set()
        return i

    def _flush(self) -> None:
        self._flush_handle = None
        if self.closed:
            return
        try:
            if self._send_queued():
                return
        except OSError as e:
            self._fail(str(e))
            return
        self._writer = self.loop.create_task(self._write_rest())

    async def _write_rest(self) -> None:
        fd = self.sock.fileno()
        try:
            while not self.closed:
                ready = self.loop.create_future()
                self.loop.add_writer(fd, lambda f=ready: f.done() or f.set_result(None))
                try:
                    async with asyncio.timeout(self.stall_timeout):
                        await ready
                finally:
                    self.loop.remove_writer(fd)
                if self._send_queued():
                    break
        except TimeoutError:
            self._fail(f"peer stopped reading for {self.stall_timeout:g} s")
        except OSError as e:
            self._fail(str(e))
        finally:
            self._writer = None
            self._room.set()

    def _fail(self, reason: str) -> None:
        self.write_error = reason
        self.abort()
        self._out.clear()
        self.queued = 0
        self._room.set()

    def abort(self) -> None:
        """Shut the socket down: pending receives and sends wake up and fail, nothing more goes out."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._room.set()

    def close(self) -> None:
        """Release the socket; call once nothing waits on it any more."""
        self.abort()
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_writer(self.sock.fileno())
            self.sock.close()
