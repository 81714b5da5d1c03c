"""The generic I/O layer (QEMU's block/io.c) through small in-test drivers that record every call."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from typing import Any

import pytest
from blockgraph import io
from blockgraph.backend import BlockBackend
from blockgraph.driver import ReqFlags, Status
from blockgraph.errors import BlockIOError, NotSupported, OptionError

FUA, MAY_UNMAP, NO_FALLBACK = ReqFlags.FUA, ReqFlags.MAY_UNMAP, ReqFlags.NO_FALLBACK
NONE = ReqFlags.NONE


@pytest.fixture
def run(bg_runner: Any) -> Any:
    return bg_runner.run


@pytest.fixture
def ram(tsession: Any, run: Any) -> Any:
    """``ram(**options)`` opens a RAM node; ``driver=`` picks a variant."""
    counter = itertools.count()

    def make(driver: str = "ram", **opts: Any) -> Any:
        name = opts.pop("name", f"r{next(counter)}")
        return run(tsession.open_node({"driver": driver, "node-name": name, **opts}))

    return make


def data_calls(node: Any, *ops: str) -> list[tuple]:
    ops = ops or ("read", "write", "zeroes", "discard")
    return [c for c in node.driver.calls if c[0] in ops]


def assert_aligned(node: Any, align: int, max_len: int = 0) -> None:
    for call in data_calls(node):
        assert call[1] % align == 0 and call[2] % align == 0, call
        if max_len:
            assert call[2] <= max_len, call


def pattern(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


# ---------------------------------------------------------------- bounds and permissions


def test_reads_past_the_end_are_zeros_and_never_reach_the_driver(ram: Any, run: Any) -> None:
    node = ram(size=1000, fill=0xAA, align=512)
    buf = bytearray(b"\xff" * 3000)
    run(io.preadv(node, 500, memoryview(buf)))
    assert buf == b"\xaa" * 500 + bytes(2500)
    assert data_calls(node) == [("read", 0, 1024, NONE)]  # the aligned remainder only
    node.driver.calls.clear()
    run(io.preadv(node, 4096, memoryview(buf)))
    assert buf == bytes(3000) and data_calls(node) == []


def test_read_only_node_refuses_writes(ram: Any, run: Any) -> None:
    node = ram(**{"read-only": True})
    for call in (io.pwritev(node, 0, memoryview(b"x")), io.pwrite_zeroes(node, 0, 512), io.pdiscard(node, 0, 512)):
        with pytest.raises(BlockIOError, match="Block node is read-only") as info:
            run(call)
        assert info.value.errno == 1
    assert data_calls(node) == []


def test_child_edges_check_write_and_resize(tsession: Any, run: Any) -> None:
    ro = run(tsession.open_node({"driver": "tcow", "node-name": "ro", "read-only": True,
                                 "file": {"driver": "ram", "node-name": "f1", "size": 8192}}))
    with pytest.raises(BlockIOError, match="Block node is read-only"):
        run(ro.file.pwritev(0, memoryview(b"x" * 512)))
    rw = run(tsession.open_node({"driver": "tcow", "node-name": "rw", "size": 16384,
                                 "file": {"driver": "ram", "node-name": "f2", "size": 8192}}))
    # A format may append to its file: the metadata edge holds the resize permission.
    run(rw.file.pwritev(8192, memoryview(b"y" * 4096)))
    assert rw.file.node.length == 12288 and rw.file.getlength() == 12288
    raw_user = run(tsession.open_node({"driver": "raw", "node-name": "win", "size": 4096,
                                       "file": {"driver": "ram", "node-name": "f3", "size": 8192}}))
    run(BlockBackend.attach_new(tsession, raw_user, share_all=True))
    with pytest.raises(BlockIOError, match="resize permission"):
        run(raw_user.file.pwritev(8192, memoryview(b"z" * 512)))
    run(raw_user.file.pwritev(4096, memoryview(b"z" * 512)))  # inside is fine


# ---------------------------------------------------------------- alignment


def test_unaligned_read_goes_through_an_aligned_bounce(ram: Any, run: Any) -> None:
    node = ram(size=8192, align=512)
    node.driver.data[:] = pattern(8192)
    buf = bytearray(1000)
    run(io.preadv(node, 100, memoryview(buf)))
    assert buf == pattern(8192)[100:1100]
    assert data_calls(node) == [("read", 0, 1536, NONE)]


def test_unaligned_write_is_read_modify_write(ram: Any, run: Any) -> None:
    node = ram(size=8192, align=512, fill=0x11)
    run(io.pwritev(node, 100, memoryview(b"\x22" * 1000)))
    assert data_calls(node) == [("read", 0, 512, NONE), ("read", 1024, 512, NONE), ("write", 0, 1536, NONE)]
    assert node.driver.data[:1536] == b"\x11" * 100 + b"\x22" * 1000 + b"\x11" * 436
    node.driver.calls.clear()
    run(io.pwritev(node, 4100, memoryview(b"\x33" * 10)))  # inside one block: one read
    assert data_calls(node) == [("read", 4096, 512, NONE), ("write", 4096, 512, NONE)]
    assert node.driver.data[4096:4112] == b"\x11" * 4 + b"\x33" * 10 + b"\x11" * 2


def _serial_results(initial: bytes, writes: list[tuple[int, bytes]]) -> set[bytes]:
    results = set()
    for order in itertools.permutations(writes):
        img = bytearray(initial)
        for off, data in order:
            img[off:off + len(data)] = data
        results.add(bytes(img))
    return results


@pytest.mark.parametrize("seed", range(12))
def test_overlapping_unaligned_writes_are_serialised(ram: Any, run: Any, seed: int) -> None:
    rnd = random.Random(seed)
    node = ram(size=4096, align=512, yields=rnd.randint(1, 3), fill=0xEE)
    writes = []
    for i in range(6):
        off = rnd.randrange(0, 1400)
        writes.append((off, bytes([i + 1]) * rnd.randint(1, 900)))

    async def go() -> None:
        await asyncio.gather(*(io.pwritev(node, off, memoryview(data)) for off, data in writes))

    run(go())
    assert bytes(node.driver.data) in _serial_results(b"\xee" * 4096, writes)
    assert node.in_flight == 0 and node.serialising == 0 and not node.tracked
    assert_aligned(node, 512)


def test_reads_wait_for_overlapping_rmw(ram: Any, run: Any) -> None:
    node = ram(size=4096, align=512, yields=3, fill=0x01)

    async def go() -> bytes:
        buf = bytearray(512)
        write = asyncio.ensure_future(io.pwritev(node, 10, memoryview(b"\x02" * 100)))
        await asyncio.sleep(0)  # the RMW is in flight and serialising
        await io.preadv(node, 0, memoryview(buf))
        assert write.done()
        return bytes(buf)

    assert run(go()) == b"\x01" * 10 + b"\x02" * 100 + b"\x01" * 402


# ---------------------------------------------------------------- max transfer


def test_requests_are_split_by_max_transfer(ram: Any, run: Any) -> None:
    node = ram(size=65536, align=512, **{"max-transfer": 4096})
    data = pattern(20000, 2)
    run(io.pwritev(node, 100, memoryview(data)))
    buf = bytearray(30000)
    run(io.preadv(node, 7, memoryview(buf)))
    assert bytes(buf[93:20093]) == data
    assert_aligned(node, 512, max_len=4096)
    writes = data_calls(node, "write")
    assert sum(c[2] for c in writes) == 20480 and len(writes) == 5


def test_zero_fallback_is_split_by_max_transfer(ram: Any, run: Any) -> None:
    node = ram("ram-nozero", size=65536, **{"max-transfer": 4096, "fill": 0x55})
    run(io.pwrite_zeroes(node, 1000, 20000))
    assert node.driver.data[1000:21000] == bytes(20000) and node.driver.data[999] == 0x55
    assert all(c[2] <= 4096 for c in data_calls(node)) and data_calls(node, "zeroes") == []


# ---------------------------------------------------------------- write zeroes


def test_native_write_zeroes(ram: Any, run: Any) -> None:
    node = ram(size=8192, fill=0xFF)
    run(io.pwrite_zeroes(node, 1024, 4096))
    assert data_calls(node) == [("zeroes", 1024, 4096, NONE)]
    assert node.driver.data == b"\xff" * 1024 + bytes(4096) + b"\xff" * 3072


@pytest.mark.parametrize("variant", [{"driver": "ram-nozero"}, {"zeroes": "notsup"}])
def test_write_zeroes_falls_back_to_writing_zeros(ram: Any, run: Any, variant: dict[str, Any]) -> None:
    node = ram(size=8192, fill=0xFF, **variant)
    run(io.pwrite_zeroes(node, 1024, 4096))
    assert node.driver.data == b"\xff" * 1024 + bytes(4096) + b"\xff" * 3072
    writes = data_calls(node, "write")
    assert sum(c[2] for c in writes) == 4096 and all(c[3] == NONE for c in writes)


@pytest.mark.parametrize("variant", [{"driver": "ram-nozero"}, {"zeroes": "notsup"}])
def test_no_fallback_refuses_slow_zeroing(ram: Any, run: Any, variant: dict[str, Any]) -> None:
    node = ram(size=8192, fill=0xFF, **variant)
    with pytest.raises(NotSupported):
        run(io.pwrite_zeroes(node, 0, 4096, NO_FALLBACK))
    assert data_calls(node, "write") == [] and node.driver.data == b"\xff" * 8192


def test_unaligned_write_zeroes_edges_are_written(ram: Any, run: Any) -> None:
    node = ram(size=8192, align=512, fill=0xFF)
    run(io.pwrite_zeroes(node, 100, 2000))
    assert node.driver.data == b"\xff" * 100 + bytes(2000) + b"\xff" * 6092
    assert ("zeroes", 512, 1536, NONE) in node.driver.calls
    assert_aligned(node, 512)
    node.driver.calls.clear()
    with pytest.raises(NotSupported):
        run(io.pwrite_zeroes(node, 100, 2000, NO_FALLBACK))


def test_write_zeroes_alignment_and_maximum(ram: Any, run: Any) -> None:
    node = ram(size=65536, fill=0xFF, **{"zero-align": 4096, "max-zeroes": 8192})
    run(io.pwrite_zeroes(node, 1000, 30000))
    assert node.driver.data[1000:31000] == bytes(30000)
    assert node.driver.data[:1000] == b"\xff" * 1000 and node.driver.data[31000:] == b"\xff" * (65536 - 31000)
    zeroes = data_calls(node, "zeroes")
    assert zeroes and all(c[1] % 4096 == 0 and c[2] % 4096 == 0 and c[2] <= 8192 for c in zeroes)
    assert sum(c[2] for c in zeroes) == 28672 - 4096  # [4096, 28672) natively, the edges as writes


def test_may_unmap_only_reaches_nodes_that_discard(ram: Any, run: Any) -> None:
    keep = ram(size=8192)
    unmap = ram(size=8192, discard="unmap")
    run(io.pwrite_zeroes(keep, 0, 4096, MAY_UNMAP))
    run(io.pwrite_zeroes(unmap, 0, 4096, MAY_UNMAP))
    assert data_calls(keep) == [("zeroes", 0, 4096, NONE)]
    assert data_calls(unmap) == [("zeroes", 0, 4096, MAY_UNMAP)]


# ---------------------------------------------------------------- discard


def test_discard_is_ignored_unless_enabled(ram: Any, run: Any) -> None:
    node = ram(size=65536, fill=0x77)
    run(io.pdiscard(node, 0, 65536))
    assert data_calls(node) == [] and node.driver.data == b"\x77" * 65536


def test_discard_drops_unaligned_head_and_tail(ram: Any, run: Any) -> None:
    node = ram(size=65536, discard="unmap", **{"discard-align": 4096})
    run(io.pdiscard(node, 1000, 10000))
    run(io.pdiscard(node, 100, 200))
    assert data_calls(node) == [("discard", 4096, 4096)]


def test_discard_without_driver_support_is_a_no_op(ram: Any, run: Any) -> None:
    node = ram("ram-nozero", size=8192, discard="unmap", fill=0x12)
    run(io.pdiscard(node, 0, 8192))
    assert node.driver.data == b"\x12" * 8192


# ---------------------------------------------------------------- detect-zeroes


@pytest.mark.parametrize(("opts", "expect"), [
    ({}, ("write", 0, 4096, NONE)),
    ({"detect-zeroes": "on"}, ("zeroes", 0, 4096, NONE)),
    ({"detect-zeroes": "on", "discard": "unmap"}, ("zeroes", 0, 4096, NONE)),
    ({"detect-zeroes": "unmap", "discard": "unmap"}, ("zeroes", 0, 4096, MAY_UNMAP)),
])
def test_detect_zeroes(ram: Any, run: Any, opts: dict[str, Any], expect: tuple) -> None:
    node = ram(size=8192, fill=0x44, **opts)
    run(io.pwritev(node, 0, memoryview(bytes(4096))))
    run(io.pwritev(node, 4096, memoryview(b"\x01" + bytes(4095))))
    assert data_calls(node) == [expect, ("write", 4096, 4096, NONE)]
    assert node.driver.data == bytes(4096) + b"\x01" + bytes(4095)


def test_detect_zeroes_unmap_needs_discard_unmap(tsession: Any, run: Any) -> None:
    with pytest.raises(OptionError, match="detect-zeroes to unmap is not allowed without setting discard"):
        run(tsession.open_node({"driver": "ram", "detect-zeroes": "unmap"}))


# ---------------------------------------------------------------- FUA and flush


def test_fua_is_emulated_by_flush(ram: Any, run: Any) -> None:
    node = ram(size=8192)
    run(io.pwritev(node, 0, memoryview(b"a" * 512), FUA))
    run(io.pwrite_zeroes(node, 512, 512, FUA))
    assert node.driver.calls == [("write", 0, 512, NONE), ("flush",), ("zeroes", 512, 512, NONE), ("flush",)]


def test_native_fua_is_passed_down(ram: Any, run: Any) -> None:
    node = ram(size=8192, fua=True)
    run(io.pwritev(node, 0, memoryview(b"a" * 512), FUA))
    assert node.driver.calls == [("write", 0, 512, FUA)]


def test_flush_writes_metadata_before_the_file_and_skips_when_clean(tsession: Any, run: Any) -> None:
    top = run(tsession.open_node({"driver": "tcow", "node-name": "top",
                                  "file": {"driver": "ram", "node-name": "f", "size": 65536}}))
    run(io.pwritev(top, 0, memoryview(b"d" * 4096)))
    tsession.events.clear()
    run(io.flush(top))
    flushes = [e for e in tsession.events if "flush" in e[1]]
    assert flushes == [("top", "flush_to_os"), ("top", "flush"), ("f", "flush")]
    tsession.events.clear()
    run(io.flush(top))  # nothing written since: metadata is offered to the OS, nothing is synced
    assert [e for e in tsession.events if "flush" in e[1]] == [("top", "flush_to_os")]


def test_cache_no_flush_skips_the_sync_but_not_the_metadata(tsession: Any, run: Any) -> None:
    top = run(tsession.open_node({"driver": "tcow", "node-name": "top", "cache": {"no-flush": True},
                                  "file": {"driver": "ram", "node-name": "f", "size": 65536}}))
    assert top.file.node.no_flush  # inherited by the child
    run(io.pwritev(top, 0, memoryview(b"d" * 4096)))
    tsession.events.clear()
    run(io.flush(top))
    assert [e for e in tsession.events if "flush" in e[1]] == [("top", "flush_to_os")]


def test_flush_does_not_reach_children_that_are_only_read(tsession: Any, run: Any) -> None:
    top = run(tsession.open_node({"driver": "tcow", "node-name": "top",
                                  "file": {"driver": "ram", "node-name": "f", "size": 65536},
                                  "backing": {"driver": "ram", "node-name": "b", "size": 65536}}))
    run(io.pwritev(top, 0, memoryview(b"d" * 4096)))
    tsession.events.clear()
    run(io.flush(top))
    assert ("f", "flush") in tsession.events and not [e for e in tsession.events if e[0] == "b"]


# ---------------------------------------------------------------- drain


def test_drain_waits_for_requests_in_flight(tsession: Any, run: Any) -> None:
    top = run(tsession.open_node({"driver": "tcow", "node-name": "top",
                                  "file": {"driver": "ram", "node-name": "f", "size": 65536, "yields": 20}}))
    f = top.file.node

    async def go() -> None:
        tasks = [asyncio.ensure_future(io.pwritev(top, i * 4096, memoryview(bytes([i + 1]) * 4096)))
                 for i in range(5)]
        tasks.append(asyncio.ensure_future(io.pwritev(f, 40000, memoryview(b"z" * 100))))
        await asyncio.sleep(0)
        assert top.in_flight == 5 and f.driver.in_flight > 0
        await io.drain(top)
        assert all(t.done() for t in tasks)
        assert top.in_flight == 0 and f.in_flight == 0 and f.driver.in_flight == 0

    run(go())
    assert f.driver.data[:20480] == b"".join(bytes([i + 1]) * 4096 for i in range(5))


def test_serialize_requests_driver_sees_one_request_at_a_time(ram: Any, run: Any) -> None:
    node = ram("ram-serial", size=65536, yields=5)

    async def go() -> None:
        await asyncio.gather(*(io.pwritev(node, i * 4096, memoryview(b"s" * 4096)) for i in range(8)))

    run(go())
    assert node.driver.max_in_flight == 1
    parallel = ram(size=65536, yields=5)

    async def go2() -> None:
        await asyncio.gather(*(io.pwritev(parallel, i * 4096, memoryview(b"s" * 4096)) for i in range(8)))

    run(go2())
    assert parallel.driver.max_in_flight == 8


# ---------------------------------------------------------------- block status


def test_block_status_recurses_through_raw_to_file_holes(tsession: Any, run: Any, bg_tmp_image: Any) -> None:
    path = bg_tmp_image(size=1 << 20)
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), b"\x01" * 65536, 65536)
    node = run(tsession.open_image(str(path), fmt="raw"))
    hole = run(io.block_status(node, 0, 1 << 20))
    assert hole.flags & Status.ZERO and not hole.flags & Status.DATA and hole.length == 65536
    data = run(io.block_status(node, 65536, 1 << 20))
    assert data.flags & (Status.DATA | Status.OFFSET_VALID | Status.ALLOCATED) == (
        Status.DATA | Status.OFFSET_VALID | Status.ALLOCATED)
    assert (data.length, data.offset, data.file) == (65536, 65536, node.file.node)
    tail = run(io.block_status(node, 131072, 1 << 20))
    assert tail.flags & Status.ZERO and tail.flags & Status.EOF and tail.length == (1 << 20) - 131072
    window = run(tsession.open_node({"driver": "raw", "offset": 65536, "size": 131072,
                                     "file": {"driver": "file", "filename": str(path)}}))
    st = run(io.block_status(window, 0, 131072))
    assert st.flags & Status.DATA and (st.offset, st.length) == (65536, 65536)
    st = run(io.block_status(window, 65536, 131072))
    assert st.flags & Status.ZERO and st.flags & Status.EOF and st.length == 65536
    assert run(io.block_status(window, 131072, 10)).flags == Status.EOF


def _chain(tsession: Any, run: Any) -> tuple[Any, Any]:
    base = run(tsession.open_node({"driver": "tcow", "node-name": "base", "size": 65536,
                                   "file": {"driver": "ram", "node-name": "bf", "size": 65536}}))
    top = run(tsession.open_node({"driver": "tcow", "node-name": "top", "size": 131072, "backing": "base",
                                  "file": {"driver": "ram", "node-name": "tf", "size": 131072}}))
    return base, top


def test_block_status_above_walks_the_backing_chain(tsession: Any, run: Any) -> None:
    base, top = _chain(tsession, run)
    run(io.pwritev(base, 0, memoryview(b"b" * 8192)))
    run(io.pwritev(top, 8192, memoryview(b"t" * 4096)))
    st, depth = run(io.block_status_above(top, 0, 131072))
    assert st.flags & Status.ALLOCATED and st.flags & Status.DATA and (st.length, depth) == (8192, 1)
    assert st.file is base.file.node
    st, depth = run(io.block_status_above(top, 8192, 131072))
    assert st.flags & Status.ALLOCATED and (st.length, depth) == (4096, 0) and st.file is top.file.node
    st, depth = run(io.block_status_above(top, 12288, 131072))
    assert not st.flags & Status.ALLOCATED and depth == 1 and st.length == 65536 - 12288
    st, depth = run(io.block_status_above(top, 65536, 131072))  # past the end of the backing file
    assert st.flags & Status.ZERO and not st.flags & Status.DATA and st.length == 65536
    st, depth = run(io.block_status_above(top, 0, 131072, base=base))
    assert not st.flags & Status.ALLOCATED and depth == 0 and st.length == 8192
    assert run(io.block_status(top, 0, 131072)).flags == Status.NONE  # the top alone holds nothing there


def test_copy_on_read_fills_the_top_node(tsession: Any, run: Any) -> None:
    base, top = _chain(tsession, run)
    data = pattern(16384, 3)
    run(io.pwritev(base, 0, memoryview(data)))
    top.driver.calls.clear()
    buf = bytearray(5000)
    run(io.preadv(top, 100, memoryview(buf), ReqFlags.COPY_ON_READ))
    assert buf == data[100:5100]
    assert top.driver.allocated == {0, 1}  # whole clusters around the request
    assert top.file.node.driver.data[:8192] == data[:8192]
    writes = [c for c in top.driver.calls if c[0] == "write"]
    assert writes and all(c[1] % 4096 == 0 and c[2] % 4096 == 0 for c in writes)
    top.driver.calls.clear()
    run(io.preadv(top, 100, memoryview(buf), ReqFlags.COPY_ON_READ))  # now allocated: no copy
    assert buf == data[100:5100] and [c for c in top.driver.calls if c[0] == "write"] == []
    assert all(c[1] % 4096 == 0 and c[2] % 4096 == 0 for c in top.driver.calls)


def test_copy_on_read_of_zeros_and_of_a_read_only_top(tsession: Any, run: Any) -> None:
    base, top = _chain(tsession, run)
    buf = bytearray(b"\xff" * 4096)
    run(io.preadv(top, 20480, memoryview(buf), ReqFlags.COPY_ON_READ))
    assert buf == bytes(4096) and 5 in top.driver.allocated
    ro = run(tsession.open_node({"driver": "tcow", "node-name": "ro", "read-only": True, "backing": "base",
                                 "file": {"driver": "ram", "node-name": "rf", "size": 65536}}))
    run(io.pwritev(base, 0, memoryview(b"q" * 4096)))
    run(io.preadv(ro, 0, memoryview(buf), ReqFlags.COPY_ON_READ))
    assert buf == b"q" * 4096 and ro.driver.allocated == set()


def test_copy_on_read_at_the_end_of_an_unaligned_node(tsession: Any, run: Any) -> None:
    base = run(tsession.open_node({"driver": "ram", "node-name": "b", "size": 6000, "fill": 0x61}))
    top = run(tsession.open_node({"driver": "tcow", "node-name": "t", "cluster": 512, "size": 6000,
                                  "backing": "b", "file": {"driver": "ram", "node-name": "tf", "size": 6144}}))
    buf = bytearray(b"\xff" * 300)
    run(io.preadv(top, 5700, memoryview(buf), ReqFlags.COPY_ON_READ))
    assert buf == b"\x61" * 300
    assert all(c[1] + c[2] <= 6144 for c in top.driver.calls if c[0] in ("read", "write"))
    # Lengths count whole sectors, as in QEMU: the 6000-byte base is a 6144-byte node.
    assert base.length == 6144
    assert base.driver.calls[-1][1] + base.driver.calls[-1][2] <= 6144


def test_concurrent_drains_all_return(ram: Any, run: Any) -> None:
    node = ram(size=65536, yields=10)

    async def go() -> None:
        writes = [asyncio.ensure_future(io.pwritev(node, i * 512, memoryview(b"c" * 512))) for i in range(4)]
        await asyncio.sleep(0)
        await asyncio.wait_for(asyncio.gather(io.drain(node), io.drain(node), io.drain(node)), timeout=30)
        assert all(w.done() for w in writes) and node.in_flight == 0

    run(go())
