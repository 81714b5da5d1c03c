"""Drained sections hold every user above a node, not only the one that asked."""

from __future__ import annotations

import asyncio
from typing import Any

from blockgraph import io
from blockgraph.backend import BlockBackend


def test_a_drained_section_holds_every_backend_on_the_node(tsession: Any, bg_runner: Any) -> None:
    async def body() -> None:
        node = await tsession.open_node({"driver": "ram", "node-name": "disk", "size": 65536, "yields": 3})
        a = await BlockBackend.attach_new(tsession, node, share_all=True)
        b = await BlockBackend.attach_new(tsession, node, share_all=True)
        inflight = asyncio.ensure_future(b.pwritev(0, memoryview(b"\x01" * 512)))
        await asyncio.sleep(0)
        assert node.in_flight == 1
        order: list[str] = []
        async with io.drained(node):
            assert node.in_flight == 0 and inflight.done()  # what was in flight finished first
            held = [asyncio.ensure_future(blk.preadv(0, memoryview(bytearray(512)))) for blk in (a, b)]
            for h in held:
                h.add_done_callback(lambda _: order.append("request"))
            for _ in range(10):
                await asyncio.sleep(0)
            assert not any(h.done() for h in held)  # both users' new requests wait
            assert node.driver.calls[-1][0] == "write"
            order.append("end of section")
        await asyncio.gather(*held)
        assert order == ["end of section", "request", "request"]

    bg_runner.run(body())


def test_draining_a_child_waits_for_requests_in_flight_above_it(tsession: Any, bg_runner: Any) -> None:
    async def body() -> None:
        top = await tsession.open_node({"driver": "tcow", "node-name": "top", "size": 65536,
                                        "file": {"driver": "ram", "node-name": "tf", "size": 65536,
                                                 "yields": 5}})
        blk = await BlockBackend.attach_new(tsession, top, share_all=True)
        pending = asyncio.ensure_future(blk.pwritev(0, memoryview(b"\x02" * 4096)))
        await asyncio.sleep(0)
        async with io.drained(tsession.find_node("tf")):
            assert pending.done() and top.in_flight == 0
        await blk.close()

    bg_runner.run(body())
