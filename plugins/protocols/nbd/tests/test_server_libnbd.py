"""Targeted protocol cases against the server with libnbd's Python bindings (Debian python3-libnbd)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
from blockgraph import hookimpl
from blockgraph.driver import DriverKind, ReqFlags
from blockgraph.options import opt, parse_size
from blockgraph.plugins import PluginHost
from blockgraph_nbd.server_testing import ServerThread

if "/usr/lib/python3/dist-packages" not in sys.path:
    sys.path.append("/usr/lib/python3/dist-packages")
try:
    import nbd
except ImportError as e:  # pragma: no cover - depends on the host
    pytest.skip(f"libnbd's Python bindings are not importable: {e}", allow_module_level=True)

pytestmark = pytest.mark.interop

MiB = 1 << 20


# ---------------------------------------------------------------- a RAM disk that cannot zero quickly


@attrs.frozen(kw_only=True)
class RamOptions:
    size: int = opt(converter=parse_size)
    align: int = opt(1, converter=parse_size)


class SlowZeroRam:
    """No pwrite_zeroes and no native FUA: zeroing falls back to writing zeros, FUA to a flush."""

    name: ClassVar[str] = "test-slowzero"
    kind: ClassVar[DriverKind] = DriverKind.PROTOCOL
    api_version: ClassVar[int] = 1
    Options: ClassVar[type] = RamOptions
    flushes: ClassVar[list[int]] = [0]

    async def open(self, node: Any, options: RamOptions) -> None:
        self.data = bytearray(options.size)
        node.set_limits(request_alignment=options.align)

    async def close(self) -> None:
        pass

    async def getlength(self) -> int:
        return len(self.data)

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        buf[:] = memoryview(self.data)[offset:offset + len(buf)]

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        self.data[offset:offset + len(buf)] = buf

    async def flush(self) -> None:
        SlowZeroRam.flushes[0] += 1


class _RamPlugin:
    @hookimpl
    def blockgraph_register_drivers(self, register: Any) -> None:
        register(SlowZeroRam)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"\xab" * MiB)
    return path


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path / "srv.sock", host=PluginHost(extra=[(_RamPlugin(), "test-slowzero")])) as s:
        yield s


def connect(uri: str, *contexts: str) -> nbd.NBD:
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    return h


# ---------------------------------------------------------------- handshake facts


def test_block_sizes_and_flags(srv: ServerThread, image: Path) -> None:
    srv.export(image, writable=True)
    h = connect(srv.uri())
    assert (h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED),
            h.get_block_size(nbd.SIZE_MAXIMUM)) == (1, 4096, 32 * MiB)
    assert h.get_size() == 8 * MiB
    assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero() and h.can_fast_zero()
    assert h.can_df() and h.can_cache() and h.can_multi_conn() and not h.is_read_only()
    h.shutdown()


def test_block_size_of_an_aligned_node(srv: ServerThread) -> None:
    srv.export_node({"driver": "test-slowzero", "size": "1M", "align": "4096"}, writable=True)
    h = connect(srv.uri())  # libnbd asks for block sizes: it is told the node's alignment
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 4096
    h.set_strict_mode(0)
    h.pwrite(b"\x07" * 100, 4000)  # unaligned all the same: the generic layer does read-modify-write
    assert h.pread(104, 3998) == b"\0\0" + b"\x07" * 100 + b"\0\0"
    h.shutdown()
    blind = nbd.NBD()
    blind.set_request_block_size(False)
    blind.set_opt_mode(True)
    blind.connect_uri(srv.uri())
    with pytest.raises(nbd.Error):  # NBD_OPT_INFO without a block-size request: ERR_BLOCK_SIZE_REQD
        blind.opt_info()
    blind.opt_go()  # GO is served, with a minimum of 1 since the client did not ask
    assert blind.get_block_size(nbd.SIZE_MINIMUM) == 1
    blind.shutdown()


@pytest.mark.parametrize(("limit", "writable", "multi"), [(1, True, False), (1, False, False), (0, True, True),
                                                           (4, True, True), (0, False, True)])
def test_multi_conn_only_when_several_connections_are_allowed(tmp_path: Path, image: Path, limit: int,
                                                              writable: bool, multi: bool) -> None:
    with ServerThread(tmp_path / "m.sock", max_connections=limit) as s:
        s.export(image, writable=writable)
        h = connect(s.uri())
        assert h.can_multi_conn() is multi
        assert h.is_read_only() is not writable
        h.shutdown()


def test_unknown_export_is_refused(srv: ServerThread, image: Path) -> None:
    srv.export(image, name="there")
    with pytest.raises(nbd.Error, match=r"no export named 'missing'"):
        connect(srv.uri("missing"))


def test_meta_contexts_listed_and_selected(srv: ServerThread, image: Path) -> None:
    srv.export(image, allocation_depth=True)
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(srv.uri())
    seen: list[str] = []
    assert h.opt_list_meta_context(lambda name: seen.append(name) or 0) == 2
    assert seen == ["base:allocation", "qemu:allocation-depth"]
    h.add_meta_context("qemu:")  # a namespace alone lists, but selects nothing
    h.add_meta_context("qemu:dirty-bitmap:nope")
    h.add_meta_context("base:allocation")
    h.opt_go()
    assert h.can_meta_context("base:allocation")
    assert not h.can_meta_context("qemu:allocation-depth")
    h.shutdown()


def test_allocation_depth_is_absent_unless_asked_for(srv: ServerThread, image: Path) -> None:
    srv.export(image)
    h = connect(srv.uri(), "base:allocation", "qemu:allocation-depth")
    assert h.can_meta_context("base:allocation")
    assert not h.can_meta_context("qemu:allocation-depth")
    h.shutdown()


# ---------------------------------------------------------------- reads and block status


def _chunks(h: nbd.NBD, count: int, offset: int, flags: int = 0) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []

    def chunk(buf: bytes, off: int, status: int, err: Any) -> int:
        out.append((off, len(buf), status))
        return 0

    h.pread_structured(count, offset, chunk, flags)
    return sorted(out)


def test_structured_read_sends_holes_unless_df(srv: ServerThread, image: Path) -> None:
    srv.export(image)
    h = connect(srv.uri())
    assert _chunks(h, 3 * MiB, 0) == [(0, MiB, nbd.READ_HOLE), (MiB, MiB, nbd.READ_DATA),
                                      (2 * MiB, MiB, nbd.READ_HOLE)]
    assert _chunks(h, 3 * MiB, 0, nbd.CMD_FLAG_DF) == [(0, 3 * MiB, nbd.READ_DATA)]
    assert _chunks(h, 4096, 0) == [(0, 4096, nbd.READ_DATA)]  # under 64 KiB a hole is not worth a walk
    assert h.pread(4096, MiB - 2048) == bytes(2048) + b"\xab" * 2048
    h.shutdown()


def test_sparse_reads_follow_writes(srv: ServerThread, image: Path) -> None:
    srv.export(image, writable=True, discard="unmap")
    h = connect(srv.uri())
    assert _chunks(h, MiB, MiB) == [(MiB, MiB, nbd.READ_DATA)]
    h.zero(MiB, MiB)  # punches a hole where the server just saw data
    assert h.pread(MiB, MiB) == bytes(MiB)
    assert _chunks(h, MiB, 3 * MiB) == [(3 * MiB, MiB, nbd.READ_HOLE)]
    h.pwrite(b"\x44" * MiB, 3 * MiB)
    assert _chunks(h, MiB, 3 * MiB) == [(3 * MiB, MiB, nbd.READ_DATA)]
    assert h.pread(MiB, 3 * MiB) == b"\x44" * MiB
    h.shutdown()


def test_read_past_the_end_is_einval(srv: ServerThread, image: Path) -> None:
    srv.export(image)
    h = connect(srv.uri())
    h.set_strict_mode(0)  # let the request reach the server
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, 8 * MiB - 1024)
    assert e.value.errnum == 22
    assert h.pread(1024, 8 * MiB - 1024) == bytes(1024)  # the connection goes on
    h.shutdown()


def _extents(h: nbd.NBD, count: int, offset: int, flags: int = 0) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}

    def extent(ctx: str, off: int, entries: list[int], err: Any) -> int:
        out[ctx] = list(entries)
        return 0

    h.block_status(count, offset, extent, flags)
    return out


def test_block_status_per_context_and_req_one(srv: ServerThread, image: Path) -> None:
    srv.export(image, allocation_depth=True)
    h = connect(srv.uri(), "base:allocation", "qemu:allocation-depth")
    got = _extents(h, 4 * MiB, 0)
    assert got["base:allocation"] == [MiB, 3, MiB, 0, 2 * MiB, 3]
    assert got["qemu:allocation-depth"] == [4 * MiB, 1]
    one = _extents(h, 4 * MiB, 512 * 1024, nbd.CMD_FLAG_REQ_ONE)
    assert one["base:allocation"] == [512 * 1024, 3]
    h.shutdown()


def test_block_status_needs_a_context(srv: ServerThread, image: Path) -> None:
    srv.export(image)
    h = connect(srv.uri())
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error):
        _extents(h, MiB, 0)
    assert h.pread(16, MiB) == b"\xab" * 16
    h.shutdown()


# ---------------------------------------------------------------- writes


def test_fua_write_reaches_the_disk_through_a_flush(srv: ServerThread) -> None:
    srv.export_node({"driver": "test-slowzero", "size": "4M"}, writable=True)
    h = connect(srv.uri())
    before = SlowZeroRam.flushes[0]
    h.pwrite(b"\x11" * 4096, 8192, nbd.CMD_FLAG_FUA)
    assert SlowZeroRam.flushes[0] == before + 1  # the driver has no FUA: core flushes after the write
    h.pwrite(b"\x22" * 4096, 16384)
    assert SlowZeroRam.flushes[0] == before + 1
    h.flush()
    assert SlowZeroRam.flushes[0] == before + 2
    assert h.pread(4096, 8192) == b"\x11" * 4096
    h.shutdown()


def test_fast_zero_fails_fast_when_zeroing_would_be_slow(srv: ServerThread) -> None:
    srv.export_node({"driver": "test-slowzero", "size": "4M"}, writable=True)
    h = connect(srv.uri())
    h.pwrite(b"\x33" * 65536, 0)
    with pytest.raises(nbd.Error) as e:
        h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
    assert e.value.errnum == 95  # ENOTSUP, and nothing was written
    assert h.pread(65536, 0) == b"\x33" * 65536
    h.zero(65536, 0, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(65536, 0) == bytes(65536)
    h.shutdown()


def test_fast_zero_on_a_file_succeeds(srv: ServerThread, image: Path) -> None:
    srv.export(image, writable=True, discard="unmap")
    h = connect(srv.uri())
    h.zero(MiB, MiB, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(MiB, MiB) == bytes(MiB)
    h.trim(MiB, 4 * MiB)
    h.cache(MiB, 0)
    h.flush()
    h.shutdown()
    assert image.read_bytes()[MiB:2 * MiB] == bytes(MiB)


def test_writes_to_a_read_only_export_are_eperm(srv: ServerThread, image: Path) -> None:
    srv.export(image)
    h = connect(srv.uri())
    h.set_strict_mode(0)
    for op in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.zero(512, 0), lambda: h.trim(512, 0)):
        with pytest.raises(nbd.Error) as e:
            op()
        assert e.value.errnum == 1
    h.shutdown()
    assert image.read_bytes()[:512] == bytes(512)


def test_write_past_the_end_is_enospc(srv: ServerThread, image: Path) -> None:
    srv.export(image, writable=True)
    h = connect(srv.uri())
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"y" * 4096, 8 * MiB - 2048)
    assert e.value.errnum == 28
    h.pwrite(b"z" * 2048, 8 * MiB - 2048)
    h.shutdown()
    assert image.read_bytes()[-2048:] == b"z" * 2048


def test_many_requests_in_flight(srv: ServerThread, tmp_path: Path) -> None:
    path = tmp_path / "pattern.raw"
    path.write_bytes(b"".join(bytes([i]) * 65536 for i in range(128)))
    srv.export(path, writable=True)
    h = connect(srv.uri())
    bufs = {}
    for i in range(128):
        buf = nbd.Buffer(65536)
        bufs[h.aio_pread(buf, i * 65536)] = (i, buf)
    assert h.aio_in_flight() > 1
    while h.aio_in_flight():
        h.poll(-1)
    for cookie, (i, buf) in bufs.items():
        assert h.aio_command_completed(cookie)
        assert buf.to_bytearray() == bytes([i]) * 65536
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([255 - i]) * 4096), i * 65536) for i in range(64)]
    while h.aio_in_flight():
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in cookies)
    h.flush()
    h.shutdown()
    data = path.read_bytes()
    assert all(data[i * 65536:i * 65536 + 4096] == bytes([255 - i]) * 4096 for i in range(64))


def test_a_client_over_the_limit_waits_for_a_free_slot(tmp_path: Path, image: Path) -> None:
    import threading

    with ServerThread(tmp_path / "one.sock", max_connections=1) as s:
        s.export(image)
        first = connect(s.uri())
        second = nbd.NBD()
        done = threading.Event()
        errors: list[BaseException] = []

        def late() -> None:
            try:
                second.connect_uri(s.uri())
            except BaseException as e:  # reported below
                errors.append(e)
            done.set()

        t = threading.Thread(target=late, daemon=True)
        t.start()
        assert not done.wait(0.5)  # held in the listen backlog, not refused
        assert first.pread(4, MiB) == b"\xab" * 4
        first.shutdown()
        assert done.wait(30) and not errors
        assert second.pread(4, MiB) == b"\xab" * 4
        second.shutdown()
        t.join(10)
