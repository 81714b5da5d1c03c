"""The nbd client driver against real servers: qemu-nbd and nbdkit, over unix sockets and TCP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import errno
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from blockgraph.errors import BlockIOError, OpenError, OptionError
from blockgraph.session import Session
from blockgraph_nbd.client import NbdDriver, parse_nbd_filename
from blockgraph_nbd.client_handshake import Address, list_exports

pytestmark = pytest.mark.interop
QEMU_NBD = shutil.which("qemu-nbd")
NBDKIT = shutil.which("nbdkit")
QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
need_qemu = pytest.mark.skipif(not (QEMU_NBD and QEMU_IMG and QEMU_IO), reason="qemu-nbd/qemu-img/qemu-io missing")
need_nbdkit = pytest.mark.skipif(not NBDKIT, reason="nbdkit missing")
BLOCKGRAPH = [sys.executable, "-m", "blockgraph.cli.main"]
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc: subprocess.Popen, addr: str | tuple[str, int]) -> None:
    family = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
    for _ in range(1000):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read().decode()}")
        with socket.socket(family) as s:
            try:
                s.connect(addr)
                return
            except OSError:
                time.sleep(0.01)
    raise RuntimeError("server did not start listening")


class Server:
    """A server process and the URL that reaches it."""

    def __init__(self, argv: list[str], url: str, addr: str | tuple[str, int]) -> None:
        self.argv, self.url, self.addr = argv, url, addr
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_listening(self.proc, addr)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()


def qemu_nbd(tmp_path: Path, image: Path, fmt: str = "raw", *extra: str, tcp: bool = False) -> Server:
    if tcp:
        port = free_port()
        return Server([QEMU_NBD, "-t", "-e", "8", "-b", "127.0.0.1", "-p", str(port), "-f", fmt, *extra, str(image)],
                      f"nbd://127.0.0.1:{port}", ("127.0.0.1", port))
    sock = str(tmp_path / f"qn-{image.name}.sock")
    return Server([QEMU_NBD, "-t", "-e", "8", "-k", sock, "-f", fmt, *extra, str(image)],
                  f"nbd+unix:///?socket={sock}", sock)


def nbdkit(tmp_path: Path, *args: str, tcp: bool = False) -> Server:
    if tcp:
        port = free_port()
        return Server([NBDKIT, "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port), *args],
                      f"nbd://127.0.0.1:{port}", ("127.0.0.1", port))
    sock = str(tmp_path / "kit.sock")
    return Server([NBDKIT, "-f", "--exit-with-parent", "-U", sock, *args], f"nbd+unix:///?socket={sock}", sock)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.stop()


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


def dash_c(cmds: list[str]) -> list[str]:
    return [arg for c in cmds for arg in ("-c", c)]


def make_image(tmp_path: Path, fmt: str = "raw", size: str = "4M") -> Path:
    path = tmp_path / f"disk.{fmt}"
    assert run(QEMU_IMG, "create", "-f", fmt, str(path), size).returncode == 0
    cmds = ["write -P 0xab 64k 128k", "write -P 0x01 1M 4k", "write -z 2M 64k", "write -P 0xcd 3M 512k"]
    res = run(QEMU_IO, "-f", fmt, *dash_c(cmds), str(path))
    assert res.returncode == 0, res.stderr
    return path


async def open_node(url: str, read_only: bool = False, **options: object):
    session = Session()
    tree = {"driver": "nbd", "read-only": read_only, **parse_nbd_filename(url), **options}
    return session, await session.open_node(tree)


# ------------------------------------------------------------------ filenames


@pytest.mark.parametrize(("name", "tree"), [
    ("nbd://example.org/disk", {"server": {"type": "inet", "host": "example.org", "port": "10809"}, "export": "disk"}),
    ("nbd+tcp://127.0.0.1:1234", {"server": {"type": "inet", "host": "127.0.0.1", "port": "1234"}}),
    ("nbd://[::1]:99/a%20b", {"server": {"type": "inet", "host": "::1", "port": "99"}, "export": "a b"}),
    ("nbd+unix:///exp?socket=/run/x.sock", {"server": {"type": "unix", "path": "/run/x.sock"}, "export": "exp"}),
    ("nbd:localhost:777", {"server": {"type": "inet", "host": "localhost", "port": "777"}}),
    ("nbd:host:1:exportname=e1", {"server": {"type": "inet", "host": "host", "port": "1"}, "export": "e1"}),
    ("nbd:unix:/tmp/s:exportname=x", {"server": {"type": "unix", "path": "/tmp/s"}, "export": "x"}),
    ("nbd:[::1]:5", {"server": {"type": "inet", "host": "::1", "port": "5"}}),
])
def test_parse_filename(name: str, tree: dict) -> None:
    assert NbdDriver.parse_filename(name) == tree


@pytest.mark.parametrize("name", ["nbd+unix://host/x?socket=/s", "nbd+unix:///x", "nbd://h/x?socket=/s",
                                  "nbd://:80/x", "nbd+rdma://h/x", "nbd:unix:", "nbd://h:port/x"])
def test_parse_filename_refuses(name: str) -> None:
    with pytest.raises(OptionError, match="No valid URL specified"):
        NbdDriver.parse_filename(name)


def test_tls_creds_refused_clearly() -> None:
    async def go() -> None:
        with pytest.raises(OptionError, match=r"tls-creds.*not supported yet"):
            await open_node("nbd://127.0.0.1:1/x", **{"tls-creds": "tls0"})

    asyncio.run(go())


def test_missing_server_is_an_option_error() -> None:
    with pytest.raises(OptionError, match="NBD server address missing"):
        NbdDriver.parse_filename("nbd:")

    async def go() -> None:
        session = Session()
        with pytest.raises(OptionError, match="NBD server address missing"):
            await session.open_node({"driver": "nbd", "export": "x"})

    asyncio.run(go())


def test_refused_connection_is_an_open_error() -> None:
    async def go() -> None:
        with pytest.raises(OpenError, match=f"Failed to connect to '127.0.0.1:{port}': Connection refused"):
            await open_node(f"nbd://127.0.0.1:{port}/x")

    port = free_port()
    asyncio.run(go())


# ------------------------------------------------------------------ qemu-nbd


@need_qemu
@pytest.mark.parametrize(("fmt", "tcp"), [("raw", False), ("qcow2", True)])
def test_info_map_convert_match_qemu_img(tmp_path: Path, servers: list[Server], fmt: str, tcp: bool) -> None:
    image = make_image(tmp_path, fmt)
    srv = qemu_nbd(tmp_path, image, fmt, tcp=tcp)
    servers.append(srv)
    ours = run(*BLOCKGRAPH, "img", "info", "-f", "raw", srv.url)
    theirs = run(QEMU_IMG, "info", "-f", "raw", srv.url)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout  # the image line too: QEMU's canonical URL
    assert "disk size: unavailable" in ours.stdout
    ours = run(*BLOCKGRAPH, "img", "map", "-f", "raw", "--output=json", srv.url)
    theirs = run(QEMU_IMG, "map", "-f", "raw", "--output=json", srv.url)
    assert ours.returncode == 0, ours.stderr
    assert json.loads(ours.stdout) == json.loads(theirs.stdout)
    assert any(not e["data"] and e["zero"] for e in json.loads(ours.stdout))  # holes went through to the server
    out_ours, out_theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    res = run(*BLOCKGRAPH, "img", "convert", "-f", "raw", "-O", "raw", srv.url, str(out_ours))
    assert res.returncode == 0, res.stderr
    assert run(QEMU_IMG, "convert", "-f", "raw", "-O", "raw", srv.url, str(out_theirs)).returncode == 0
    assert out_ours.read_bytes() == out_theirs.read_bytes()
    assert run(QEMU_IMG, "compare", "-U", "-f", fmt, "-F", "raw", str(image), str(out_ours)).returncode == 0


@need_qemu
def test_io_patterns_verified_by_qemu_io(tmp_path: Path, servers: list[Server]) -> None:
    image = make_image(tmp_path)
    srv = qemu_nbd(tmp_path, image, "raw", "--discard=unmap")
    servers.append(srv)
    cmds = ["write -P 0x11 0 64k", "aio_write -P 0x22 64k 64k", "aio_write -P 0x33 128k 3k", "aio_flush",
            "write -f -P 0x44 512k 64k", "write -z 1M 8k", "write -z -u 3M 64k", "discard 3200k 64k",
            "writev -P 0x55 2100k 4k 512 8k"]
    res = run(*BLOCKGRAPH, "io", "-f", "raw", *dash_c(cmds), srv.url)
    assert res.returncode == 0 and "failed" not in res.stdout, res.stdout + res.stderr
    checks = ["read -P 0x11 0 64k", "read -P 0x22 64k 64k", "read -P 0x33 128k 3k", "read -P 0xab 131k 1k",
              "read -P 0x44 512k 64k", "read -P 0 1M 8k", "read -P 0 3M 64k", "read -P 0 3200k 64k",
              "read -P 0x55 2100k 12800"]
    res = run(QEMU_IO, "-r", "-f", "raw", *dash_c(checks), srv.url)
    assert "Pattern verification failed" not in res.stdout, res.stdout


@need_qemu
def test_many_requests_in_flight_on_one_connection(tmp_path: Path, servers: list[Server]) -> None:
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(4 * MIB))
    srv = qemu_nbd(tmp_path, image, tcp=True)
    servers.append(srv)

    async def go() -> None:
        session, node = await open_node(srv.url)
        try:
            from blockgraph import io

            async def one(i: int) -> None:
                data = bytes([i]) * (16384 + 512 * i)
                await io.pwritev(node, i * 65536, memoryview(data))
                back = bytearray(len(data))
                await io.preadv(node, i * 65536, memoryview(back))
                assert back == data

            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), 60)
            await io.flush(node)
        finally:
            await session.close()

    asyncio.run(go())
    raw = image.read_bytes()
    for i in range(64):
        assert raw[i * 65536:i * 65536 + 16384 + 512 * i] == bytes([i]) * (16384 + 512 * i)


@need_qemu
def test_read_only_export_and_unknown_export(tmp_path: Path, servers: list[Server]) -> None:
    image = make_image(tmp_path)
    srv = qemu_nbd(tmp_path, image, "raw", "-r", "-x", "named", "-D", "the description")
    servers.append(srv)
    url = srv.url.replace("///", "///named")

    async def go() -> None:
        with pytest.raises(OpenError, match="Could not open image: Permission denied"):
            await open_node(url)
        with pytest.raises(OpenError, match="Requested export not available\nserver reported: export 'other'"):
            await open_node(srv.url.replace("///", "///other"), read_only=True)
        session, _ = await open_node(url, read_only=True)
        await session.close()
        session = Session()  # the filename option instead of server/export
        node = await session.open_node({"driver": "nbd", "filename": url, "read-only": True})
        assert node.driver.export == "named" and node.length == 4 * MIB
        await session.close()
        assert await list_exports(Address("unix", path=srv.addr)) == [("named", "the description")]

    asyncio.run(go())


@need_qemu
def test_allocation_depth_and_dirty_bitmap(tmp_path: Path, servers: list[Server]) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    assert run(QEMU_IMG, "create", "-f", "qcow2", str(base), "1M").returncode == 0
    assert run(QEMU_IO, "-c", "write -P 1 0 64k", str(base)).returncode == 0
    assert run(QEMU_IMG, "create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)).returncode == 0
    assert run(QEMU_IMG, "bitmap", "--add", str(top), "b0").returncode == 0
    assert run(QEMU_IO, "-c", "write -P 2 128k 64k", str(top)).returncode == 0
    srv = qemu_nbd(tmp_path, top, "qcow2", "-r", "-A", "-B", "b0")
    servers.append(srv)

    async def go() -> None:
        session, node = await open_node(srv.url, read_only=True)
        try:
            drv = node.driver
            assert await drv.allocation_depth(0, MIB) == (65536, 2)
            assert await drv.allocation_depth(65536, MIB) == (65536, 0)
            assert await drv.allocation_depth(131072, MIB) == (65536, 1)
        finally:
            await session.close()

    asyncio.run(go())
    opts = f"driver=nbd,server.type=unix,server.path={srv.addr},x-dirty-bitmap=qemu:dirty-bitmap:b0"
    ours = run(*BLOCKGRAPH, "img", "map", "--output=json", "--image-opts", opts)
    theirs = run(QEMU_IMG, "map", "--output=json", "--image-opts", opts)
    assert ours.returncode == 0, ours.stderr
    assert json.loads(ours.stdout) == json.loads(theirs.stdout)
    assert [e["data"] for e in json.loads(ours.stdout)] == [True, False, True]  # dirty shows as "not data"


# ------------------------------------------------------------------ nbdkit


@need_nbdkit
@pytest.mark.parametrize("tcp", [False, True])
def test_nbdkit_memory_round_trip_and_zeroes(tmp_path: Path, servers: list[Server], tcp: bool) -> None:
    srv = nbdkit(tmp_path, "memory", "4M", tcp=tcp)
    servers.append(srv)

    async def go() -> None:
        from blockgraph import io
        from blockgraph.driver import ReqFlags, Status

        session, node = await open_node(srv.url)
        try:
            await io.pwritev(node, 4096, memoryview(b"\x7f" * 8192), ReqFlags.FUA)
            await io.pwrite_zeroes(node, 8192, 4096, ReqFlags.MAY_UNMAP)
            back = bytearray(12288)
            await io.preadv(node, 4096, memoryview(back))
            assert back == b"\x7f" * 4096 + bytes(8192)
            st = await io.block_status(node, 2 * MIB, MIB)
            assert st.flags & Status.ZERO and not st.flags & Status.DATA
            await io.pdiscard(node, 0, 4 * MIB)
            await io.flush(node)
        finally:
            await session.close()

    asyncio.run(go())


@need_nbdkit
def test_nbdkit_data_plugin_and_unaligned_size(tmp_path: Path, servers: list[Server]) -> None:
    srv = nbdkit(tmp_path, "data", "data=1 2 3 @1000 0xff*24")  # 1024 bytes, the last 24 are 0xff
    servers.append(srv)

    async def go() -> None:
        from blockgraph import io

        session, node = await open_node(srv.url, read_only=True)
        try:
            back = bytearray(1024)
            await io.preadv(node, 0, memoryview(back))
            assert back[:3] == b"\1\2\3" and back[3:1000] == bytes(997) and back[1000:] == b"\xff" * 24
        finally:
            await session.close()

    asyncio.run(go())


@need_nbdkit
@pytest.mark.parametrize("flags", [["--no-sr"], ["--mask-handshake=0"], ["-o"], ["--filter=noextents"]],
                         ids=["simple-replies", "export-name", "oldstyle", "no-extents"])
def test_nbdkit_older_protocol_variants(tmp_path: Path, servers: list[Server], flags: list[str]) -> None:
    srv = nbdkit(tmp_path, *flags, "memory", "1M")
    servers.append(srv)

    async def go() -> None:
        from blockgraph import io
        from blockgraph.driver import Status

        session, node = await open_node(srv.url)
        try:
            await asyncio.gather(*(io.pwritev(node, i * 4096, memoryview(bytes([i + 1]) * 4096)) for i in range(32)))
            back = bytearray(32 * 4096)
            await io.preadv(node, 0, memoryview(back))
            assert back == b"".join(bytes([i + 1]) * 4096 for i in range(32))
            st = await io.block_status(node, 0, MIB)
            assert st.flags & Status.DATA
        finally:
            await session.close()

    asyncio.run(go())


@need_nbdkit
def test_nbdkit_error_filter_maps_errno(tmp_path: Path, servers: list[Server]) -> None:
    srv = nbdkit(tmp_path, "--filter=error", "memory", "1M", "error-pread=ENOSPC", "error-pread-rate=100%",
                 "error-pwrite=EPERM", "error-pwrite-rate=100%", "error-zero=EIO", "error-zero-rate=100%")
    servers.append(srv)

    async def go() -> None:
        from blockgraph import io

        session, node = await open_node(srv.url)
        try:
            with pytest.raises(BlockIOError) as e:
                await io.preadv(node, 0, memoryview(bytearray(4096)))
            assert e.value.errno == errno.ENOSPC
            with pytest.raises(BlockIOError) as e:
                await io.pwritev(node, 0, memoryview(bytes(4096)))
            assert e.value.errno == errno.EPERM
            with pytest.raises(BlockIOError) as e:
                await io.pwrite_zeroes(node, 0, 4096)
            assert e.value.errno == errno.EIO
            back = bytearray(4096)  # the connection survives server errors
            with pytest.raises(BlockIOError):
                await io.preadv(node, 4096, memoryview(back))
        finally:
            await session.close()

    asyncio.run(go())


@need_nbdkit
def test_nbdkit_delay_filter_slow_reads_beside_fast_writes(tmp_path: Path, servers: list[Server]) -> None:
    """Slow reads and fast writes in flight together on one connection all land where they belong."""
    srv = nbdkit(tmp_path, "--filter=delay", "memory", "1M", "rdelay=100ms")
    servers.append(srv)

    async def go() -> None:
        from blockgraph import io

        session, node = await open_node(srv.url)
        try:
            bufs = [bytearray(4096) for _ in range(4)]
            reads = [io.preadv(node, 65536 + i * 4096, memoryview(bufs[i])) for i in range(4)]
            writes = [io.pwritev(node, i * 4096, memoryview(bytes([9 + i]) * 4096)) for i in range(4)]
            await asyncio.wait_for(asyncio.gather(*reads, *writes), 30)
            assert all(b == bytes(4096) for b in bufs)
            back = bytearray(4 * 4096)
            await io.preadv(node, 0, memoryview(back))
            assert back == b"".join(bytes([9 + i]) * 4096 for i in range(4))
        finally:
            await session.close()

    asyncio.run(go())


@need_nbdkit
@pytest.mark.parametrize("mode", ["default", "slow", "none"])
def test_fast_zero(tmp_path: Path, servers: list[Server], mode: str) -> None:
    """FAST_ZERO is sent for NO_FALLBACK; a server that cannot zero fast (or lacks the flag) gives NotSupported."""
    srv = nbdkit(tmp_path, "--filter=nozero", "memory", "1M", "zeromode=plugin", f"fastzeromode={mode}")
    servers.append(srv)

    async def go() -> None:
        from blockgraph import io
        from blockgraph.driver import ReqFlags
        from blockgraph.errors import NotSupported

        session, node = await open_node(srv.url)
        try:
            await io.pwritev(node, 0, memoryview(b"\3" * 65536))
            if mode == "default":
                await node.driver.pwrite_zeroes(0, 65536, ReqFlags.NO_FALLBACK | ReqFlags.MAY_UNMAP)
                back = bytearray(65536)
                await io.preadv(node, 0, memoryview(back))
                assert back == bytes(65536)
            else:
                with pytest.raises(NotSupported):
                    await node.driver.pwrite_zeroes(0, 65536, ReqFlags.NO_FALLBACK)
            await node.driver.cache(0, 65536)  # NBD_CMD_CACHE, or nothing when the server cannot
        finally:
            await session.close()

    asyncio.run(go())


@need_nbdkit
@need_qemu
def test_nbdkit_file_map_and_convert_match_qemu_img(tmp_path: Path, servers: list[Server]) -> None:
    image = make_image(tmp_path)
    srv = nbdkit(tmp_path, "file", str(image), tcp=True)
    servers.append(srv)
    ours = run(*BLOCKGRAPH, "img", "map", "-f", "raw", "--output=json", srv.url)
    theirs = run(QEMU_IMG, "map", "-f", "raw", "--output=json", srv.url)
    assert ours.returncode == 0, ours.stderr
    assert json.loads(ours.stdout) == json.loads(theirs.stdout)
    out = tmp_path / "out.qcow2"
    res = run(*BLOCKGRAPH, "img", "convert", "-f", "raw", "-O", "qcow2", srv.url, str(out))
    assert res.returncode == 0, res.stderr
    assert run(QEMU_IMG, "compare", "-f", "raw", "-F", "qcow2", str(image), str(out)).returncode == 0


@need_nbdkit
def test_block_size_constraints_are_honoured(tmp_path: Path, servers: list[Server]) -> None:
    """The server refuses requests outside its advertised sizes, so success proves alignment and splitting."""
    srv = nbdkit(tmp_path, "--filter=blocksize-policy", "memory", "4M", "blocksize-minimum=4096",
                 "blocksize-preferred=65536", "blocksize-maximum=65536", "blocksize-error-policy=error")
    servers.append(srv)

    async def go() -> None:
        from blockgraph import io

        session, node = await open_node(srv.url)
        try:
            lim = node.limits
            assert (lim.request_alignment, lim.opt_transfer, lim.max_transfer) == (4096, 65536, 65536)
            await io.pwritev(node, 1000, memoryview(b"\x42" * 3000))  # read-modify-write of one 4 KiB block
            data = b"".join(bytes([i % 251]) for i in range(MIB))
            await io.pwritev(node, MIB, memoryview(data))  # split into 64 KiB requests
            back = bytearray(4096)
            await io.preadv(node, 0, memoryview(back))
            assert back[:1000] == bytes(1000) and back[1000:4000] == b"\x42" * 3000
            got = bytearray(MIB)
            await io.preadv(node, MIB, memoryview(got))
            assert got == data
        finally:
            await session.close()

    asyncio.run(go())


@need_nbdkit
@need_qemu
@pytest.mark.parametrize("mode", ["default", "slow"])
def test_write_zeroes_no_fallback_like_qemu_io(tmp_path: Path, servers: list[Server], mode: str) -> None:
    """`write -z -n` (NO_FALLBACK) reaches the server as FAST_ZERO; a server slow at it refuses, as with qemu-io."""
    srv = nbdkit(tmp_path, "--filter=nozero", "memory", "1M", "zeromode=plugin", f"fastzeromode={mode}")
    servers.append(srv)
    cmds = dash_c(["write -P 7 0 64k", "write -z -n 0 64k", "read -P 0 0 64k"])
    ours = run(*BLOCKGRAPH, "io", "-f", "raw", *cmds, srv.url)
    theirs = run(QEMU_IO, "-f", "raw", *cmds, srv.url)
    first = [line for line in ours.stdout.splitlines() if "ops/sec" not in line and "bytes at offset 0" not in line]
    assert first == [line for line in theirs.stdout.splitlines()
                     if "ops/sec" not in line and "bytes at offset 0" not in line]
    assert ("write failed: Operation not supported" in ours.stdout) == (mode == "slow")
    assert ("Pattern verification failed" in ours.stdout) == (mode == "slow")


@need_qemu
def test_convert_into_an_nbd_target(tmp_path: Path, servers: list[Server]) -> None:
    """`img convert -n` writes an existing export (data and zeroes) that qemu-img then finds identical."""
    src = make_image(tmp_path, "qcow2")
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xee" * (4 * MIB))  # stale data the zeroed ranges must overwrite
    srv = qemu_nbd(tmp_path, target, "raw", tcp=True)
    servers.append(srv)
    res = run(*BLOCKGRAPH, "img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(src), srv.url)
    assert res.returncode == 0, res.stderr
    res = run(QEMU_IMG, "compare", "-f", "qcow2", "-F", "raw", str(src), srv.url)
    assert res.returncode == 0, res.stdout + res.stderr
