"""The synchronous facade's fast path: a request runs its first step inline and finishes in a task only if it
suspends (``blockgraph.sync.Image._run``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import blockgraph
import pytest


def test_requests_that_suspend_finish_on_the_loop() -> None:
    # null-co with a latency sleeps in every request, so each one goes through the resume path.
    spec = 'json:{"driver": "null-co", "read-zeroes": true, "latency-ns": 100000, "size": 1048576}'
    with blockgraph.open(spec) as d:
        buf = bytearray(b"\xff" * 4096)
        d.readinto(8192, buf)
        assert buf == bytes(4096)
        d.write(0, b"x" * 512)
        assert d.read(0, 512) == bytes(512)


def test_inline_and_resumed_reads_agree(bg_tmp_image: Any) -> None:
    data = bytes(range(256)) * 256
    path: Path = bg_tmp_image(size=1 << 20, data=data)
    with blockgraph.open(str(path), "raw", read_only=True) as d, \
            blockgraph.open(str(path), "raw", read_only=True, options={"cache": {"direct": True}}) as direct:
        assert direct.blk.node.children["file"].node.driver.direct  # O_DIRECT: every read goes to a thread
        for off, n in [(0, 4096), (512, 1000), (65536 - 100, 300), (0, 65536)]:
            want = data[off:off + n].ljust(n, b"\0")
            assert d.read(off, n) == want == direct.read(off, n)


def test_results_and_errors_cross_the_suspension(bg_tmp_image: Any) -> None:
    path: Path = bg_tmp_image(size=65536)

    async def fails_later(caught: bool) -> str:
        await asyncio.sleep(0)  # a bare yield: the task reschedules it
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_exception, ValueError("late"))
        try:
            await fut
        except ValueError:
            if caught:
                return "caught"
            raise
        return "not reached"

    async def plain() -> int:
        return 7

    with blockgraph.open(str(path), "raw") as d:
        assert d._run(plain()) == 7
        assert d._run(fails_later(True)) == "caught"
        with pytest.raises(ValueError, match="late"):
            d._run(fails_later(False))
        assert d.read(0, 16) == bytes(16)  # the facade still works after an error


def test_refused_from_a_running_loop(bg_tmp_image: Any) -> None:
    path: Path = bg_tmp_image(size=65536)
    d = blockgraph.open(str(path), "raw")
    try:
        async def inside() -> None:
            d.read(0, 512)

        with pytest.raises(RuntimeError, match="running event loop"):
            asyncio.run(inside())
        assert d.read(0, 512) == bytes(512)
    finally:
        d.close()


def test_large_reads_return_fresh_bytes(bg_tmp_image: Any) -> None:
    # read() of 256 KiB and more fills a new bytes object in place instead of copying a bytearray.
    data = bytes(range(251)) * 4200  # ~1 MiB, a period that never aligns with the request
    path: Path = bg_tmp_image(size=2 << 20, data=data)
    with blockgraph.open(str(path), "raw", read_only=True) as d:
        first = d.read(1000, 512 * 1024)
        second = d.read(1000, 512 * 1024)
        assert type(first) is bytes and first is not second
        assert first == second == data[1000:1000 + 512 * 1024]
        assert hash(first) == hash(data[1000:1000 + 512 * 1024])
        tail = d.read((2 << 20) - (300 << 10), 300 << 10)
        assert tail == bytes(300 << 10)
