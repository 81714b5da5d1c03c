"""Servers that break the protocol or go away: clean EIO for the affected requests, no hang; reconnect keeps writes.

The misbehaving servers are tiny asyncio servers in this file. ``asyncio.wait_for`` only guards against
hangs; nothing here asserts how long anything takes.
"""

from __future__ import annotations

import asyncio
import errno
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from blockgraph import io
from blockgraph.errors import BlockIOError, OpenError
from blockgraph.session import Session
from blockgraph_nbd import protocol as p

QEMU_NBD = shutil.which("qemu-nbd")
SIZE = 1 << 20
GUARD = 20  # seconds; only a hang guard
Behaviour = Callable[[p.Request, asyncio.StreamWriter], Awaitable[None]]


async def fake_server(path: str, behaviour: Behaviour, *, greeting: bytes | None = None,
                      no_go: bool = False) -> asyncio.AbstractServer:
    """A fixed-newstyle server with structured replies and base:allocation; ``behaviour`` answers each request."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(greeting if greeting is not None else p.HELLO.pack(p.NBDMAGIC, p.IHAVEOPT) + b"\0\3")
            await reader.readexactly(4)
            while True:
                option, length = p.decode_option_header(await reader.readexactly(16))
                data = await reader.readexactly(length)
                if option == p.Opt.SET_META_CONTEXT:
                    _, queries = p.decode_meta_context_request(data)
                    if p.CONTEXT_BASE_ALLOCATION in queries:
                        writer.write(p.encode_option_reply(option, p.Rep.META_CONTEXT,
                                                           p.encode_meta_context_reply(7, p.CONTEXT_BASE_ALLOCATION)))
                elif option == p.Opt.EXPORT_NAME:  # the old way in: no reply header, no zero padding (NO_ZEROES)
                    writer.write(p.EXPORT_NAME_REPLY.pack(SIZE, p.TransmissionFlag.HAS_FLAGS))
                    break
                elif option == p.Opt.GO and not no_go:
                    flags = p.TransmissionFlag.HAS_FLAGS | p.TransmissionFlag.SEND_FLUSH
                    writer.write(p.encode_option_reply(option, p.Rep.INFO, p.encode_info_export(SIZE, flags)))
                elif option != p.Opt.STRUCTURED_REPLY:
                    writer.write(p.encode_option_reply(option, p.Rep.ERR_UNSUP))
                    continue
                writer.write(p.encode_option_reply(option, p.Rep.ACK))
                if option == p.Opt.GO:
                    break
            while True:
                req = p.decode_request(await reader.readexactly(28))
                if req.type == p.Cmd.WRITE:
                    await reader.readexactly(req.length)
                if req.type == p.Cmd.DISC:
                    break
                await behaviour(req, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(handle, path)


async def with_fake(tmp_path: Path, behaviour: Behaviour, body: Callable[[object], Awaitable[None]],
                    **server_kw: object) -> None:
    sock = str(tmp_path / "fake.sock")
    server = await fake_server(sock, behaviour, **server_kw)
    session = Session()
    try:
        node = await session.open_node({"driver": "nbd", "server": {"type": "unix", "path": sock}})
        await asyncio.wait_for(body(node), GUARD)
    finally:
        await asyncio.wait_for(session.close(), GUARD)
        server.close()


def chunk(req: p.Request, rtype: int, payload: bytes, flags: int = p.ReplyFlag.DONE) -> bytes:
    return p.encode_chunk_header(req.cookie, rtype, len(payload), flags) + payload


async def read_fails(node: object, match: str, length: int = 4096) -> None:
    with pytest.raises(BlockIOError, match=match) as e:
        await io.preadv(node, 0, memoryview(bytearray(length)))
    assert e.value.errno == errno.EIO


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, GUARD * 2))


@pytest.mark.parametrize(("reply", "match"), [
    (lambda r: b"\xde\xad\xbe\xef" + bytes(16), "bad reply magic 0xdeadbeef"),
    (lambda r: p.encode_simple_reply(r.cookie + 1000), "unknown handle"),
    (lambda r: chunk(r, p.ReplyType.OFFSET_DATA, struct.pack(">Q", r.offset) + bytes(r.length + 4096)),
     "oversized"),
    (lambda r: chunk(r, p.ReplyType.OFFSET_DATA, struct.pack(">Q", r.offset + r.length) + bytes(512)),
     "outside the request"),
    (lambda r: chunk(r, p.ReplyType.OFFSET_HOLE, struct.pack(">QI", r.offset, r.length + 1)), "outside the request"),
    (lambda r: chunk(r, p.ReplyType.BLOCK_STATUS, bytes(12)), "block status chunk"),
    (lambda r: chunk(r, 77, b""), "unknown reply chunk type 77"),
    (lambda r: p.encode_simple_reply(r.cookie), "simple reply to a read"),
    (lambda r: chunk(r, p.ReplyType.ERROR, struct.pack(">IH", 5, 100) + b"x"), "does not match"),
    (lambda r: chunk(r, p.ReplyType.OFFSET_DATA, struct.pack(">Q", r.offset) + bytes(100))[:60],
     "closed the connection in the middle of a reply"),
], ids=["bad-magic", "unknown-handle", "oversized-chunk", "chunk-outside", "hole-outside", "status-for-read",
        "unknown-chunk-type", "simple-read-reply", "bad-error-chunk", "short-reply"])
def test_protocol_violation_fails_cleanly(tmp_path: Path, reply: Callable[[p.Request], bytes], match: str) -> None:
    async def behaviour(req: p.Request, writer: asyncio.StreamWriter) -> None:
        writer.write(reply(req))
        if "middle of a reply" in match:  # the short reply: the server hangs up mid-chunk
            writer.close()

    async def body(node: object) -> None:
        await read_fails(node, match)
        await read_fails(node, "closed")  # the connection is gone; later requests fail at once, no hang

    run(with_fake(tmp_path, behaviour, body))


def test_violation_fails_every_request_in_flight(tmp_path: Path) -> None:
    seen: list[p.Request] = []

    async def behaviour(req: p.Request, writer: asyncio.StreamWriter) -> None:
        seen.append(req)
        if len(seen) == 3:
            writer.write(b"\0" * 20)

    async def body(node: object) -> None:
        results = await asyncio.gather(*(io.preadv(node, i * 4096, memoryview(bytearray(4096))) for i in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, BlockIOError) and r.errno == errno.EIO for r in results), results

    run(with_fake(tmp_path, behaviour, body))


def test_partial_coverage_and_server_error_chunk(tmp_path: Path) -> None:
    """A reply that leaves bytes unread fails only its request; an error chunk carries the server's errno."""

    async def behaviour(req: p.Request, writer: asyncio.StreamWriter) -> None:
        if req.offset == 0:
            writer.write(chunk(req, p.ReplyType.OFFSET_DATA, struct.pack(">Q", 0) + b"\1" * 2048))
        elif req.offset == 4096:
            writer.write(chunk(req, p.ReplyType.ERROR_OFFSET, struct.pack(">IH", p.NBD_ENOSPC, 2) + b"no"
                               + struct.pack(">Q", 4096)))
        else:
            writer.write(chunk(req, p.ReplyType.OFFSET_HOLE, struct.pack(">QI", req.offset, 2048), flags=0)
                         + chunk(req, p.ReplyType.OFFSET_DATA, struct.pack(">Q", req.offset + 2048) + b"\2" * 2048))

    async def body(node: object) -> None:
        await read_fails(node, "covered 2048 of 4096 bytes")
        with pytest.raises(BlockIOError) as e:
            await io.preadv(node, 4096, memoryview(bytearray(4096)))
        assert e.value.errno == errno.ENOSPC
        buf = bytearray(b"\xff" * 4096)
        await io.preadv(node, 8192, memoryview(buf))  # the connection is still in step
        assert buf == bytes(2048) + b"\2" * 2048

    run(with_fake(tmp_path, behaviour, body))


def test_bad_greeting_is_an_open_error(tmp_path: Path) -> None:
    async def go() -> None:
        sock = str(tmp_path / "fake.sock")
        server = await fake_server(sock, None, greeting=b"HTTP/1.1 400 Bad Request\r\n\r\n")  # type: ignore[arg-type]
        try:
            with pytest.raises(OpenError, match="bad server magic"):
                await Session().open_node({"driver": "nbd", "server": {"type": "unix", "path": sock}})
        finally:
            server.close()

    run(go())


# ------------------------------------------------------------------ reconnect


def start_qemu_nbd(image: Path, sock: str) -> subprocess.Popen:
    proc = subprocess.Popen([QEMU_NBD, "-t", "-e", "4", "-k", sock, "-f", "raw", str(image)], stderr=subprocess.DEVNULL)
    for _ in range(1000):
        with socket.socket(socket.AF_UNIX) as s:
            if s.connect_ex(sock) == 0:
                return proc
        time.sleep(0.01)
    raise RuntimeError("qemu-nbd did not start")


@pytest.mark.interop
@pytest.mark.skipif(not QEMU_NBD, reason="qemu-nbd missing")
def test_reconnect_keeps_acknowledged_writes(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4 << 20))
    sock = str(tmp_path / "qn.sock")
    procs = [start_qemu_nbd(image, sock)]
    acked: list[int] = []

    async def go() -> None:
        session = Session()
        node = await session.open_node({"driver": "nbd", "server": {"type": "unix", "path": sock},
                                        "reconnect-delay": 15})
        try:
            async def writer(lane: int) -> None:
                for i in range(lane, 64, 4):
                    await io.pwritev(node, i * 65536, memoryview(bytes([i + 1]) * 65536))
                    acked.append(i)

            async def killer() -> None:
                while len(acked) < 16:
                    await asyncio.sleep(0.001)
                procs[0].kill()  # mid-stream: some writes are in flight
                procs[0].wait()
                await asyncio.sleep(0.3)
                procs.append(await asyncio.to_thread(start_qemu_nbd, image, sock))

            await asyncio.gather(killer(), *(writer(lane) for lane in range(4)))
            await io.flush(node)
            back = bytearray(65536)
            await io.preadv(node, 63 * 65536, memoryview(back))
            assert back == bytes([64]) * 65536
        finally:
            await session.close()

    try:
        run(go())
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert len(procs) == 2 and sorted(acked) == list(range(64))
    data = image.read_bytes()
    for i in acked:
        assert data[i * 65536:(i + 1) * 65536] == bytes([i + 1]) * 65536, f"acknowledged write {i} lost"


@pytest.mark.interop
@pytest.mark.skipif(not QEMU_NBD, reason="qemu-nbd missing")
@pytest.mark.parametrize("delay", [0, 1])
def test_lost_server_fails_requests_after_reconnect_delay(tmp_path: Path, delay: int) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(SIZE))
    sock = str(tmp_path / "qn.sock")
    proc = start_qemu_nbd(image, sock)

    async def go() -> None:
        session = Session()
        node = await session.open_node({"driver": "nbd", "server": {"type": "unix", "path": sock},
                                        "reconnect-delay": delay})
        try:
            await io.pwritev(node, 0, memoryview(b"\1" * 4096))
            proc.kill()
            proc.wait()
            with pytest.raises(BlockIOError) as e:
                await io.pwritev(node, 4096, memoryview(b"\2" * 4096))
            assert e.value.errno == errno.EIO
            # Without a delay the text depends on who notices first: the reader (closed) or the sender (EPIPE).
            assert ("reconnect-delay expired" if delay else "NBD") in str(e.value)
        finally:
            await session.close()

    try:
        run(go())
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.interop
@pytest.mark.skipif(not QEMU_NBD, reason="qemu-nbd missing")
def test_open_timeout_waits_for_a_late_server(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\5" * SIZE)
    sock = str(tmp_path / "qn.sock")
    procs: list[subprocess.Popen] = []

    async def go() -> None:
        async def late() -> None:
            await asyncio.sleep(0.3)
            procs.append(await asyncio.to_thread(start_qemu_nbd, image, sock))

        starter = asyncio.ensure_future(late())
        session = Session()
        try:
            node = await session.open_node({"driver": "nbd", "server": {"type": "unix", "path": sock},
                                            "open-timeout": 15, "read-only": True})
            back = bytearray(4096)
            await io.preadv(node, 0, memoryview(back))
            assert back == b"\5" * 4096
        finally:
            await starter
            await session.close()

    try:
        run(go())
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_silent_server_does_not_hang_the_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from blockgraph_nbd import client

    monkeypatch.setattr(client, "HANDSHAKE_TIMEOUT", 0.2)

    async def go() -> None:
        sock = str(tmp_path / "silent.sock")
        server = await asyncio.start_unix_server(lambda r, w: asyncio.sleep(60), sock)
        try:
            with pytest.raises(OpenError, match="did not complete the handshake"):
                await Session().open_node({"driver": "nbd", "server": {"type": "unix", "path": sock}})
        finally:
            server.close()

    run(go())


def test_replies_in_reverse_order_match_their_requests(tmp_path: Path) -> None:
    """The server holds 8 reads and answers them last to first, each as a data chunk then a hole chunk."""
    held: list[p.Request] = []

    async def behaviour(req: p.Request, writer: asyncio.StreamWriter) -> None:
        held.append(req)
        if len(held) < 8:
            return
        for r in reversed(held):
            fill = bytes([r.offset // 4096 + 1]) * (r.length // 2)
            writer.write(chunk(r, p.ReplyType.OFFSET_DATA, struct.pack(">Q", r.offset + r.length // 2) + fill, flags=0)
                         + chunk(r, p.ReplyType.OFFSET_HOLE, struct.pack(">QI", r.offset, r.length // 2)))

    async def body(node: object) -> None:
        bufs = [bytearray(b"\xff" * 4096) for _ in range(8)]
        await asyncio.gather(*(io.preadv(node, i * 4096, memoryview(bufs[i])) for i in range(8)))
        for i, b in enumerate(bufs):
            assert b == bytes(2048) + bytes([i + 1]) * 2048

    run(with_fake(tmp_path, behaviour, body))


def test_server_without_go_is_entered_with_export_name(tmp_path: Path) -> None:
    async def behaviour(req: p.Request, writer: asyncio.StreamWriter) -> None:
        writer.write(chunk(req, p.ReplyType.OFFSET_DATA, struct.pack(">Q", req.offset) + b"\6" * req.length))

    async def body(node: object) -> None:
        assert node.length == SIZE and not node.driver.flags & p.TransmissionFlag.SEND_FLUSH
        buf = bytearray(4096)
        await io.preadv(node, 0, memoryview(buf))
        assert buf == b"\6" * 4096

    run(with_fake(tmp_path, behaviour, body, no_go=True))
