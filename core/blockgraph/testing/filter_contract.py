"""The filter contract: a filter forwards every request to its child, unchanged and in order.

Separate from :mod:`blockgraph.testing.contract` only to keep each module to one job; the list
``FILTER_CHECKS`` there includes it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..driver import DriverKind, Status
from .harness import ContractViolation, Harness, NotApplicable, call, pattern


async def check_filter_forwarding(h: Harness) -> None:
    """A filter shows its child's length and status and forwards each request to it, in order, unchanged.

    Needs the filter stacked over ``testing-memdisk`` (which records what reaches it), as
    :class:`~blockgraph.testing.suite.FilterContract` does.
    """
    from .memdisk import STORES

    if h.child_store is None:
        raise NotApplicable("no recording child: stack the filter over testing-memdisk (FilterContract does)")
    async with h.open() as o:
        blk, node = o.blk, o.node
        if node.kind is not DriverKind.FILTER:
            raise ContractViolation(f"{h.driver} is tested as a filter but declares kind={node.kind.value}")
        child = node.filtered
        if child is None:
            raise ContractViolation("a filter must attach its child with ChildRole.FILTERED")
        if blk.getlength() != child.node.length:
            raise ContractViolation(f"the filter's length {blk.getlength()} differs from its child's "
                                    f"{child.node.length}")
        log = STORES[h.child_store].log
        ops: list[tuple[str, int, int, Callable[[], Awaitable[Any]]]] = [
            ("read", 8192, 512, lambda: blk.preadv(8192, memoryview(bytearray(512))))]
        if h.caps.write:
            ops += [("write", 4096, 4096, lambda: blk.pwritev(4096, memoryview(pattern(h.seed, 4096)))),
                    ("zero", 65536, 65536, lambda: blk.pwrite_zeroes(65536, 65536)),
                    ("flush", 0, 0, blk.flush)]
        if h.caps.discard:
            ops.append(("discard", 131072, 65536, lambda: blk.pdiscard(131072, 65536)))
        for verb, off, n, start in ops:
            del log[:]
            await call(f"{verb} at {off}+{n} through the filter", start())
            seen = [(v, o_, n_) for v, o_, n_ in log if v != "read" or verb == "read"]
            want = [(verb, off, n)] + ([("write", off, n)] if verb == "zero" else [])
            if not any(w in seen for w in want):
                raise ContractViolation(f"{verb} at {off}+{n} on the filter reached its child as {seen or 'nothing'}")
        for off in (0, 4096, 65536):
            st, _depth = await call(f"block status at {off}", blk.block_status(off, 65536))
            inner = await call(f"child block status at {off}", child.block_status(off, 65536))
            if (st.flags & (Status.DATA | Status.ZERO)) != (inner.flags & (Status.DATA | Status.ZERO)):
                raise ContractViolation(f"block status at {off}: the filter says {st.flags!r}, its child "
                                        f"{inner.flags!r}")
