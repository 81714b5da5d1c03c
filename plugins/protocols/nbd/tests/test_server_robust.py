"""Misbehaving clients are dropped alone: the other clients and the image stay intact.

The misbehaving side is a raw socket speaking just enough of the protocol
(via blockgraph_nbd.protocol); the well-behaved side is libnbd.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from blockgraph_nbd import protocol as P
from blockgraph_nbd.server_testing import ServerThread

if "/usr/lib/python3/dist-packages" not in sys.path:
    sys.path.append("/usr/lib/python3/dist-packages")
try:
    import nbd
except ImportError as e:  # pragma: no cover - depends on the host
    pytest.skip(f"libnbd's Python bindings are not importable: {e}", allow_module_level=True)

pytestmark = pytest.mark.interop

MiB = 1 << 20
PATTERN = bytes(range(256)) * (4 * MiB // 256)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(PATTERN)
    return path


@pytest.fixture
def srv(tmp_path: Path, image: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path / "srv.sock", stall_timeout=0.5, handshake_timeout=1.0) as s:
        s.export(image, writable=True)
        yield s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def raw_client(srv: ServerThread, *, go: bool = True) -> socket.socket:
    """Connect and (with ``go``) negotiate structured replies and NBD_OPT_GO by hand."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(srv.socket_path)
    magic, opt = P.HELLO.unpack(recv_exactly(s, P.HELLO.size))
    assert (magic, opt) == (P.NBDMAGIC, P.IHAVEOPT)
    recv_exactly(s, P.HANDSHAKE_FLAGS.size)
    s.sendall(P.CLIENT_FLAGS.pack(P.ClientFlag.FIXED_NEWSTYLE | P.ClientFlag.NO_ZEROES))
    if go:
        for option, data in ((P.Opt.STRUCTURED_REPLY, b""), (P.Opt.GO, P.encode_info_go(""))):
            s.sendall(P.encode_option(option, data))
            while True:
                rep = P.decode_option_reply(recv_exactly(s, P.OPTION_REPLY.size))
                recv_exactly(s, rep.length)
                assert not P.rep_is_error(rep.type)
                if rep.type == P.Rep.ACK:
                    break
    return s


def closed_by_server(s: socket.socket) -> bool:
    """Drain whatever the server still sends; True once it hangs up."""
    try:
        while s.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    return True


def wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + 20
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def good_client(srv: ServerThread) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    return h


def test_garbage_request_drops_only_that_client(srv: ServerThread, image: Path) -> None:
    good = good_client(srv)
    bad = raw_client(srv)
    bad.sendall(b"\xde\xad\xbe\xef" * 64)
    assert closed_by_server(bad)
    assert good.pread(4096, 4096) == PATTERN[4096:8192]
    good.pwrite(b"\x01" * 512, 0)
    good.shutdown()
    assert image.read_bytes()[512:] == PATTERN[512:]


def test_garbage_during_the_handshake(srv: ServerThread) -> None:
    good = good_client(srv)
    bad = raw_client(srv, go=False)
    bad.sendall(b"not an option header at all, just noise")
    assert closed_by_server(bad)
    bad2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad2.settimeout(10)
    bad2.connect(srv.socket_path)
    recv_exactly(bad2, P.HELLO.size + P.HANDSHAKE_FLAGS.size)
    bad2.sendall(P.CLIENT_FLAGS.pack(0x80))  # unknown client flags
    assert closed_by_server(bad2)
    assert good.pread(16, 0) == PATTERN[:16]
    good.shutdown()


def test_silent_client_is_dropped_after_the_handshake_timeout(srv: ServerThread) -> None:
    good = good_client(srv)
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.settimeout(10)
    idle.connect(srv.socket_path)
    assert closed_by_server(idle)  # the server hangs up; recv returns b""
    assert good.pread(16, 100) == PATTERN[100:116]
    good.shutdown()


def test_disconnect_in_the_middle_of_a_write(srv: ServerThread, image: Path) -> None:
    good = good_client(srv)
    bad = raw_client(srv)
    bad.sendall(P.encode_request(P.Cmd.WRITE, 7, MiB, 65536) + b"\xff" * 1000)
    bad.close()
    wait_for(lambda: srv.client_count() == 1, "the half-written client is still connected")
    good.pwrite(b"\x02" * 4096, 2 * MiB)
    good.flush()
    assert good.pread(65536, MiB) == PATTERN[MiB:MiB + 65536]
    good.shutdown()
    data = image.read_bytes()
    assert data[MiB:MiB + 65536] == PATTERN[MiB:MiB + 65536]  # no partial write reached the image
    assert data[2 * MiB:2 * MiB + 4096] == b"\x02" * 4096


def test_flooding_client_that_never_reads_is_dropped(srv: ServerThread) -> None:
    good = good_client(srv)
    bad = raw_client(srv)
    bad.setblocking(False)
    request = P.encode_request(P.Cmd.READ, 1, 0, MiB)
    sent = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # until the server stops reading from us
        try:
            bad.send(request * 64)
            sent += 64
        except BlockingIOError:
            break
    assert sent >= 64
    assert good.pread(4096, 3 * MiB) == PATTERN[3 * MiB:3 * MiB + 4096]  # others are served meanwhile
    wait_for(lambda: srv.client_count() == 1, "the flooding client was not dropped")
    assert good.pread(4096, 0) == PATTERN[:4096]
    good.shutdown()
    bad.close()


def test_unknown_command_and_flags_are_refused_without_dropping(srv: ServerThread) -> None:
    s = raw_client(srv)
    s.sendall(P.encode_request(9, 11, 0, 0))
    hdr = P.decode_chunk_header(recv_exactly(s, P.STRUCTURED_REPLY.size))
    err, msg, _ = P.decode_error_chunk(hdr.type, recv_exactly(s, hdr.length))
    assert (hdr.cookie, err, msg) == (11, P.NBD_EINVAL, "invalid request type (9) received")
    s.sendall(P.encode_request(P.Cmd.FLUSH, 12, 0, 0, P.CmdFlag.REQ_ONE))
    hdr = P.decode_chunk_header(recv_exactly(s, P.STRUCTURED_REPLY.size))
    err, msg, _ = P.decode_error_chunk(hdr.type, recv_exactly(s, hdr.length))
    assert (hdr.cookie, err, msg) == (12, P.NBD_EINVAL, "unsupported flags for command NBD_CMD_FLUSH (got 0x8)")
    s.sendall(P.encode_request(P.Cmd.READ, 16, 0, 8, 0x100))  # a bit no flag name covers
    hdr = P.decode_chunk_header(recv_exactly(s, P.STRUCTURED_REPLY.size))
    err, msg, _ = P.decode_error_chunk(hdr.type, recv_exactly(s, hdr.length))
    assert (hdr.cookie, err, msg) == (16, P.NBD_EINVAL, "unsupported flags for command NBD_CMD_READ (got 0x100)")
    s.sendall(P.encode_request(P.Cmd.READ, 13, 4 * MiB - 512, 1024))
    hdr = P.decode_chunk_header(recv_exactly(s, P.STRUCTURED_REPLY.size))
    err, msg, _ = P.decode_error_chunk(hdr.type, recv_exactly(s, hdr.length))
    assert err == P.NBD_EINVAL and msg == "operation past EOF; From: 4193792, Len: 1024, Size: 4194304"
    s.sendall(P.encode_request(P.Cmd.READ, 14, 0, 8))
    hdr = P.decode_chunk_header(recv_exactly(s, P.STRUCTURED_REPLY.size))
    assert (hdr.cookie, hdr.type, hdr.flags) == (14, P.ReplyType.OFFSET_DATA, P.ReplyFlag.DONE)
    assert recv_exactly(s, hdr.length)[8:] == PATTERN[:8]
    s.sendall(P.encode_request(P.Cmd.DISC, 15))
    assert closed_by_server(s)


def test_export_name_option_and_simple_replies(srv: ServerThread) -> None:
    s = raw_client(srv, go=False)
    s.sendall(P.encode_option(P.Opt.EXPORT_NAME, b""))
    size, flags = P.EXPORT_NAME_REPLY.unpack(recv_exactly(s, P.EXPORT_NAME_REPLY.size))
    assert size == 4 * MiB and flags & P.TransmissionFlag.HAS_FLAGS
    assert not flags & P.TransmissionFlag.SEND_DF  # no structured replies were negotiated
    s.sendall(P.encode_request(P.Cmd.READ, 21, 256, 16))
    reply = P.decode_simple_reply(recv_exactly(s, P.SIMPLE_REPLY.size))
    assert reply == P.SimpleReply(0, 21)
    assert recv_exactly(s, 16) == PATTERN[256:272]
    s.close()
