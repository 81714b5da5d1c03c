"""The blocking pool: bounded threads, results and errors delivered to the awaiting coroutine."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from blockgraph.pool import BlockingPool


def test_results_errors_and_the_thread_bound() -> None:
    pool = BlockingPool(3, name="test-pool")
    active, peak = [0], [0]
    lock = threading.Lock()

    def job(i: int) -> int:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.002)  # let the jobs overlap
        with lock:
            active[0] -= 1
        if i == 7:
            raise OSError(5, "boom")
        return i * i

    async def main() -> list[object]:
        return await asyncio.gather(*(pool.run(job, i) for i in range(40)), return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        pool.shutdown()
    assert [r for i, r in enumerate(results) if i != 7] == [i * i for i in range(40) if i != 7]
    assert isinstance(results[7], OSError) and results[7].errno == 5
    assert 1 < peak[0] <= 3
    assert not [t for t in threading.enumerate() if t.name.startswith("test-pool")]  # all joined


def test_a_cancelled_waiter_does_not_break_delivery() -> None:
    pool = BlockingPool(2)
    gate = threading.Event()

    async def main() -> int:
        slow = asyncio.ensure_future(pool.run(gate.wait, 5))
        await asyncio.sleep(0)
        slow.cancel()
        gate.set()
        return await pool.run(lambda: 42)

    try:
        assert asyncio.run(main()) == 42
    finally:
        pool.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(_submit(pool))


async def _submit(pool: BlockingPool) -> None:
    await pool.run(lambda: None)
