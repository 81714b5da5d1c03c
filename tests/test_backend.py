"""BlockBackend: device-facing checks, write cache, error policies and iostatus, resize, drain."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest
from blockgraph.backend import BlockBackend
from blockgraph.driver import ReqFlags, Status
from blockgraph.errors import BlockIOError, OptionError, PermissionConflict
from blockgraph.perms import Perm

CR, W, WU, RS = Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE


@pytest.fixture
def run(bg_runner: Any) -> Any:
    return bg_runner.run


@pytest.fixture
def ram(tsession: Any, run: Any) -> Any:
    def make(name: str = "r", driver: str = "ram", **opts: Any) -> Any:
        return run(tsession.open_node({"driver": driver, "node-name": name, "size": 65536, **opts}))

    return make


@pytest.fixture
def blk(tsession: Any, run: Any) -> Any:
    def make(node: Any, **kw: Any) -> BlockBackend:
        return run(BlockBackend.attach_new(tsession, node, **kw))

    return make


def mv(data: bytes) -> memoryview:
    return memoryview(bytearray(data))


# ---------------------------------------------------------------- checks


def test_read_only_backend_refuses_writes_with_eperm(ram: Any, blk: Any, run: Any) -> None:
    b = blk(ram(), read_only=True)
    for call in (b.pwritev(0, mv(b"x" * 512)), b.pwrite_zeroes(0, 512), b.pdiscard(0, 512), b.truncate(4096)):
        with pytest.raises(BlockIOError) as info:
            run(call)
        assert info.value.errno == errno.EPERM and info.value.strerror == "Block node is read-only"
    assert b.node.driver.calls == []


def test_read_write_backend_on_a_read_only_node_is_refused(ram: Any, blk: Any) -> None:
    node = ram(**{"read-only": True})
    with pytest.raises(BlockIOError, match="Block node is read-only"):
        blk(node)
    assert node.parents == []


@pytest.mark.parametrize(("offset", "length"), [(65536 - 100, 512), (65536, 1), (-1, 10), (0, 65537)])
def test_out_of_range_requests_fail_with_eio(ram: Any, blk: Any, run: Any, offset: int, length: int) -> None:
    b = blk(ram())
    for call in (b.preadv(offset, mv(bytes(length))), b.pwritev(offset, mv(bytes(length))),
                 b.pwrite_zeroes(offset, length), b.pdiscard(offset, length)):
        with pytest.raises(BlockIOError) as info:
            run(call)
        assert info.value.errno == errno.EIO and info.value.strerror == "Input/output error"
    assert b.node.driver.calls == []


def test_request_at_the_very_end_is_fine(ram: Any, blk: Any, run: Any) -> None:
    b = blk(ram())
    run(b.pwritev(65536 - 512, mv(b"e" * 512)))
    buf = bytearray(512)
    run(b.preadv(65536 - 512, memoryview(buf)))
    assert buf == b"e" * 512


# ---------------------------------------------------------------- write cache


def test_write_cache_off_makes_every_write_fua(ram: Any, blk: Any, run: Any) -> None:
    emulated = blk(ram("a"), write_cache=False)
    run(emulated.pwritev(0, mv(b"a" * 512)))
    run(emulated.pwrite_zeroes(512, 512))
    assert emulated.node.driver.calls == [("write", 0, 512, ReqFlags.NONE), ("flush",),
                                          ("zeroes", 512, 512, ReqFlags.NONE), ("flush",)]
    native = blk(ram("b", fua=True), write_cache=False)
    run(native.pwritev(0, mv(b"a" * 512)))
    assert native.node.driver.calls == [("write", 0, 512, ReqFlags.FUA)]
    cached = blk(ram("c"))
    run(cached.pwritev(0, mv(b"a" * 512)))
    assert cached.node.driver.calls == [("write", 0, 512, ReqFlags.NONE)]


# ---------------------------------------------------------------- error policies


def test_error_actions_are_validated(tsession: Any) -> None:
    with pytest.raises(OptionError, match="'enospc' invalid read error action"):
        BlockBackend(tsession, rerror="enospc")
    with pytest.raises(OptionError, match="'explode' invalid write error action"):
        BlockBackend(tsession, werror="explode")


def test_report_raises_and_counts(ram: Any, blk: Any, run: Any) -> None:
    b = blk(ram(), werror="report")
    seen: list[tuple] = []
    b.on_error.append(lambda blk_, op, action, err: seen.append((op, action, err.errno)))
    b.node.driver.fail["write"] = errno.EIO
    with pytest.raises(BlockIOError) as info:
        run(b.pwritev(0, mv(b"x" * 512)))
    assert info.value.errno == errno.EIO
    assert seen == [("write", "report", errno.EIO)] and b.iostatus == "ok"
    assert b.stats["failed_wr_operations"] == 1 and b.stats["wr_operations"] == 0


def test_ignore_pretends_success(ram: Any, blk: Any, run: Any) -> None:
    b = blk(ram(fill=0x11), rerror="ignore", werror="ignore")
    seen: list[tuple] = []
    b.on_error.append(lambda blk_, op, action, err: seen.append((op, action)))
    b.node.driver.fail.update(write=errno.EIO, read=errno.EIO)
    run(b.pwritev(0, mv(b"x" * 512)))
    run(b.preadv(0, mv(bytes(512))))
    assert seen == [("write", "ignore"), ("read", "ignore")] and b.iostatus == "ok"
    assert b.node.driver.data[:512] == b"\x11" * 512


def test_enospc_stops_on_enospc_only(ram: Any, blk: Any, run: Any) -> None:
    b = blk(ram(), werror="enospc")
    b.node.driver.fail["write"] = errno.EIO
    with pytest.raises(BlockIOError):
        run(b.pwritev(0, mv(b"x" * 512)))
    assert b.iostatus == "ok"

    async def go() -> None:
        b.node.driver.fail["write"] = errno.ENOSPC
        task = asyncio.ensure_future(b.pwritev(0, mv(b"y" * 512)))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done() and b.iostatus == "nospace"
        del b.node.driver.fail["write"]
        b.resume()
        await task
        assert b.iostatus == "ok"

    run(go())
    assert b.node.driver.data[:512] == b"y" * 512


@pytest.mark.parametrize("op", ["read", "write"])
def test_stop_holds_the_request_until_resume(ram: Any, blk: Any, run: Any, op: str) -> None:
    b = blk(ram(fill=0x22), rerror="stop", werror="stop")
    actions: list[str] = []
    b.on_error.append(lambda blk_, o, action, err: actions.append(f"{o}:{action}"))

    async def go() -> bytes:
        b.node.driver.fail[op] = errno.EIO
        buf = bytearray(512)
        task = asyncio.ensure_future(b.preadv(0, memoryview(buf)) if op == "read"
                                     else b.pwritev(0, mv(b"z" * 512)))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done() and b.iostatus == "failed"
        b.resume()  # still failing: stopped again
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done() and b.iostatus == "failed"
        del b.node.driver.fail[op]
        b.resume()
        await task
        return bytes(buf)

    got = run(go())
    assert b.iostatus == "ok" and actions == [f"{op}:stop", f"{op}:stop"]
    if op == "read":
        assert got == b"\x22" * 512
    else:
        assert b.node.driver.data[:512] == b"z" * 512


# ---------------------------------------------------------------- resize


def test_truncate_takes_resize_only_for_the_duration(ram: Any, blk: Any, run: Any) -> None:
    node = ram()
    b = blk(node)
    seen: list[Perm] = []
    real = node.driver.truncate

    async def spy(length: int, exact: bool, prealloc: Any) -> None:
        seen.append(node.perm)
        await real(length, exact, prealloc)

    node.driver.truncate = spy
    assert b.root.perm == CR | W
    run(b.truncate(131072))
    assert seen == [CR | W | RS] and node.length == 131072 == b.getlength()
    assert b.root.perm == CR | W and node.perm == CR | W


def test_truncate_refused_when_another_user_unshares_resize(ram: Any, blk: Any, run: Any) -> None:
    node = ram()
    b = blk(node, share_all=True)
    other = blk(node, read_only=True, share_all=True)
    other.set_perm(CR, CR | W | WU)  # tolerates writers, not resizers
    with pytest.raises(PermissionConflict, match="'resize'"):
        run(b.truncate(131072))
    assert node.length == 65536 and b.root.perm == CR | W and node.perm == CR | W
    assert [c[0] for c in node.driver.calls] == []


def test_truncate_without_driver_support(ram: Any, blk: Any, run: Any) -> None:
    b = blk(ram(driver="ram-nozero"))
    with pytest.raises(BlockIOError) as info:
        run(b.truncate(131072))
    assert info.value.errno == errno.ENOTSUP and "does not support resize" in str(info.value)
    assert b.root.perm == CR | W


def test_resize_permission_can_be_held(ram: Any, blk: Any) -> None:
    b = blk(ram(), resize=True)
    assert b.root.perm == CR | W | RS


# ---------------------------------------------------------------- drain, close, status, copy-on-read


def test_drain_holds_new_requests_and_waits(ram: Any, blk: Any, run: Any) -> None:
    b = blk(ram(yields=10))
    order: list[str] = []

    async def write(tag: str, off: int) -> None:
        await b.pwritev(off, mv(b"d" * 512))
        order.append(tag)

    async def go() -> None:
        first = asyncio.ensure_future(write("before", 0))
        await asyncio.sleep(0)
        drained = asyncio.ensure_future(b.drain())
        await asyncio.sleep(0)
        late = asyncio.ensure_future(write("during", 512))
        await drained
        order.append("drained")
        assert first.done()
        await late

    run(go())
    assert order == ["before", "drained", "during"]
    # The late request was held while draining, so the driver never saw both at once.
    assert b.node.driver.max_in_flight == 1
    assert [c[:2] for c in b.node.driver.calls] == [("write", 0), ("write", 512)]


def test_close_flushes_what_was_written(ram: Any, blk: Any, run: Any) -> None:
    node = ram()
    b = blk(node, name="d0")
    run(b.pwritev(0, mv(b"w" * 512)))
    run(b.close())
    assert node.driver.calls[-2:] == [("flush",), ("close",)]
    assert b.root is None and "d0" not in b.session.backends
    with pytest.raises(BlockIOError, match="No medium"):
        run(b.preadv(0, mv(bytes(1))))


def test_stats(ram: Any, blk: Any, run: Any) -> None:
    b = blk(ram(discard="unmap"))
    run(b.pwritev(0, mv(b"s" * 1000)))
    run(b.preadv(0, mv(bytes(300))))
    run(b.flush())
    run(b.pdiscard(0, 4096))
    assert {k: b.stats[k] for k in ("wr_bytes", "rd_bytes", "wr_operations", "rd_operations",
                                    "flush_operations", "unmap_operations")} == {
        "wr_bytes": 1000, "rd_bytes": 300, "wr_operations": 1, "rd_operations": 1, "flush_operations": 1,
        "unmap_operations": 1}


def test_block_status_and_copy_on_read_through_the_backend(tsession: Any, blk: Any, run: Any) -> None:
    base = run(tsession.open_node({"driver": "tcow", "node-name": "base",
                                   "file": {"driver": "ram", "node-name": "bf", "size": 65536}}))
    top = run(tsession.open_node({"driver": "tcow", "node-name": "top", "backing": "base",
                                  "file": {"driver": "ram", "node-name": "tf", "size": 65536}}))
    run(blk(base, share_all=True).pwritev(0, mv(b"B" * 8192)))
    b = blk(top, share_all=True, copy_on_read=True)
    st, depth = run(b.block_status(0, 65536))
    assert st.flags & Status.ALLOCATED and (st.length, depth) == (8192, 1)
    buf = bytearray(100)
    run(b.preadv(4000, memoryview(buf)))
    assert buf == b"B" * 100 and top.driver.allocated == {0, 1}
    st, depth = run(b.block_status(0, 65536))
    assert (st.length, depth) == (8192, 0)
