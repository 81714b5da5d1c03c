"""Helpers for corrupt-input tests of format drivers: open a damaged image read-only and use it.

``exercise(path, fmt)`` opens the image read-only, reads it (the first ``read_limit`` bytes and the last
4 KiB), walks its block status and runs ``after(node)`` if given. ``survives(path, data, fmt)`` writes the
mutant, exercises it and accepts either success or a BlockGraphError with a message, and checks the file
was not written. ``refused(path, data, fmt, *fragments)`` demands an error whose text has every fragment.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..backend import BlockBackend
from ..errors import BlockGraphError
from ..session import Session


async def _exercise(path: Path, fmt: str, read_limit: int, after: Callable[[Any], None] | None) -> None:
    session = Session()
    try:
        node = await session.open_node({"driver": fmt, "read-only": True,
                                        "file": {"driver": "file", "filename": str(path)}})
        blk = await BlockBackend.attach_new(session, node, read_only=True)
        size = blk.getlength()
        if size:
            await blk.preadv(0, memoryview(bytearray(min(size, read_limit))))
        if size > read_limit:
            await blk.preadv(size - 4096, memoryview(bytearray(4096)))
        pos = 0
        for _ in range(64):
            if pos >= size:
                break
            stat, _depth = await blk.block_status(pos, size - pos)
            assert stat.length > 0, f"block status at {pos} returned an empty extent"
            pos += stat.length
        if after is not None:
            after(node)
    finally:
        await session.close()


def exercise(path: Path, fmt: str, *, read_limit: int = 8 << 20, after: Callable[[Any], None] | None = None) -> None:
    asyncio.run(_exercise(path, fmt, read_limit, after))


def survives(path: Path, data: bytes, fmt: str, **kw: Any) -> None:
    """A mutant gives data or a clear error, never a crash, and a read-only open never writes to it."""
    path.write_bytes(data)
    before = hashlib.sha256(data).digest()
    try:
        exercise(path, fmt, **kw)
    except BlockGraphError as e:
        assert str(e), "an error without a message"
    assert hashlib.sha256(path.read_bytes()).digest() == before, "a read-only open changed the image"


def refused(path: Path, data: bytes, fmt: str, *fragments: str, **kw: Any) -> BlockGraphError:
    """The damaged image must fail with an error naming what is wrong (every fragment in its text)."""
    path.write_bytes(data)
    try:
        exercise(path, fmt, **kw)
    except BlockGraphError as e:
        missing = [f for f in fragments if f not in str(e)]
        assert not missing, f"error {str(e)!r} does not mention {missing}"
        return e
    raise AssertionError(f"{path.name}: the damage was not noticed")
