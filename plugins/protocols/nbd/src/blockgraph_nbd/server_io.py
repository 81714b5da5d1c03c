"""A connected socket for the server: buffered reads, gathered writes, no payload copies.

Headers come out of one receive buffer; a WRITE payload larger than what is
already buffered is received straight into its own buffer. Replies go out with
``sendmsg`` over the caller's buffers (headers and memoryviews of the data), and
only a partial send waits for the socket, still on the same memoryviews. A peer
that stops reading for ``stall_timeout`` seconds is treated as gone.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

RECV_BUFFER = 256 * 1024
IOV_CHUNK = 512  # buffers per sendmsg, well under IOV_MAX


class PeerGone(Exception):
    """The peer closed the connection, reset it, or stopped reading."""


class Channel:
    def __init__(self, sock: socket.socket, *, stall_timeout: float | None = None) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.stall_timeout = stall_timeout
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._pos = self._end = 0
        self.closed = False

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

    def abort(self) -> None:
        """Shut the socket down: pending receives and sends wake up and fail, nothing more goes out."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Release the socket; call once nothing waits on it any more."""
        self.abort()
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_writer(self.sock.fileno())
            self.sock.close()
