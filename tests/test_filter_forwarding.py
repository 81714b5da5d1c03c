"""A filter that implements only open/close gets every data operation forwarded by core."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import blockgraph
from blockgraph.driver import DriverKind, Status
from blockgraph.perms import ChildRole
from blockgraph.testing import memdisk


@attrs.frozen(kw_only=True)
class _NoOptions:
    pass


class BareFilter:
    """Declares itself a filter and opens its child; nothing else."""

    name: ClassVar[str] = "bare-filter"
    kind: ClassVar[DriverKind] = DriverKind.FILTER
    api_version: ClassVar[int] = 1
    child_options: ClassVar[tuple[str, ...]] = ("file",)
    Options: ClassVar[type] = _NoOptions

    async def open(self, node: Any, options: _NoOptions) -> None:
        await node.open_child("file", ChildRole.FILTERED | ChildRole.PRIMARY)

    async def close(self) -> None:
        """Nothing to release."""


class _Plugin:
    @blockgraph.hookimpl
    def blockgraph_register_drivers(self, register: Any) -> None:
        register(BareFilter)


def test_bare_filter_forwards_everything(bg_plugins: Any, bg_new_session: Any, bg_runner: Any) -> None:
    session = bg_new_session(bg_plugins((_Plugin(), "bare"), memdisk))
    tree = {"driver": "bare-filter", "node-name": "flt", "discard": "unmap",
            "file": {"driver": "testing-memdisk", "size": 1 << 20, "id": "fwd", "node-name": "mem"}}

    async def body() -> None:
        node = await session.open_node(tree)
        blk = await blockgraph.BlockBackend.attach_new(session, node)
        assert blk.getlength() == 1 << 20
        await blk.pwritev(4096, memoryview(b"\xaa" * 8192))
        out = bytearray(8192)
        await blk.preadv(4096, memoryview(out))
        assert out == b"\xaa" * 8192
        assert memdisk.store("fwd").data[4096:12288] == b"\xaa" * 8192
        await blk.pwrite_zeroes(4096, 4096)
        assert memdisk.store("fwd").data[4096:8192] == bytes(4096)
        await blk.truncate(2 << 20)
        assert blk.getlength() == 2 << 20 and session.find_node("mem").length == 2 << 20
        st, depth = await blk.block_status(8192, 4096)
        assert depth == 0
        assert st.flags & Status.DATA and st.file is session.find_node("mem")
        await blk.flush()
        await blk.close()

    bg_runner.run(body())
