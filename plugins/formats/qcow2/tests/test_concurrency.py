"""Requests in flight overlap: reads run in parallel, allocating writes to different clusters overlap their data
writes, and concurrent writes into the same new cluster never lose each other's data."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

from blockgraph.backend import BlockBackend
from blockgraph.session import Session
from blockgraph_qcow2.testing import bg_create

CS = 65536


class InFlight:
    """Counts concurrent calls of one method of the file driver under the qcow2 node."""

    def __init__(self, drv: Any, name: str) -> None:
        self.now = self.peak = 0
        orig = getattr(drv, name)

        async def counted(*args: Any) -> Any:
            self.now += 1
            self.peak = max(self.peak, self.now)
            try:
                await asyncio.sleep(0)  # let the others in, as a real I/O wait would
                return await orig(*args)
            finally:
                self.now -= 1

        setattr(drv, name, counted)


async def _open(path: Path, **extra: Any) -> tuple[Session, BlockBackend, Any]:
    session = Session()
    node = await session.open_node({"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}, **extra})
    return session, await BlockBackend.attach_new(session, node), node


def test_parallel_reads_and_allocating_writes(tmp_path: Path) -> None:
    path = bg_create(tmp_path / "img.qcow2", 4 << 20)

    async def run() -> None:
        session, blk, node = await _open(path)
        try:
            file_drv = node.file.node.driver
            writes = InFlight(file_drv, "pwritev")
            data = {i: bytes([i + 1]) * CS for i in range(16)}
            await asyncio.gather(*(blk.pwritev(i * 2 * CS, memoryview(d)) for i, d in data.items()))
            assert writes.peak > 1, "allocating writes to different clusters were serialised"
            reads = InFlight(file_drv, "preadv")
            bufs = {i: bytearray(CS) for i in data}
            await asyncio.gather(*(blk.preadv(i * 2 * CS, memoryview(b)) for i, b in bufs.items()))
            assert reads.peak > 1, "reads were serialised"
            assert all(bytes(bufs[i]) == data[i] for i in data)
        finally:
            await session.close()

    asyncio.run(run())


def test_concurrent_partial_writes_into_one_new_cluster(tmp_path: Path) -> None:
    """16 sub-cluster writes racing to allocate the same cluster over a backing file: all land, COW keeps the rest."""
    base = tmp_path / "base.raw"
    backing = bytes(range(256)) * (CS * 4 // 256)
    base.write_bytes(backing)
    path = bg_create(tmp_path / "top.qcow2", 4 * CS, backing_file=str(base), backing_fmt="raw")
    rng = random.Random(3)

    async def run() -> bytes:
        session, blk, _ = await _open(path)
        try:
            model = bytearray(backing)
            jobs = []
            for k in range(16):
                off = CS + k * 4096 + rng.randrange(0, 1000)
                d = bytes([0xA0 + k]) * 1500
                model[off:off + len(d)] = d
                jobs.append(blk.pwritev(off, memoryview(d)))
            await asyncio.gather(*jobs)
            buf = bytearray(4 * CS)
            await blk.preadv(0, memoryview(buf))
            assert bytes(buf) == bytes(model)
            return bytes(model)
        finally:
            await session.close()

    model = asyncio.run(run())
    from blockgraph import sync

    with sync.open(str(path), read_only=True) as img:
        assert img.read(0, 4 * CS) == model
