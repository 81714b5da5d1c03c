"""raw against the driver contract: over a file, as an offset/size window of a file, and over null-co."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from blockgraph.backend import BlockBackend
from blockgraph.session import Session
from blockgraph.testing import DriverContract

WINDOW = 65536


def sparse_image(tmp_path: Path, size: int, fill: bytes = b"") -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.write(fill)
        f.truncate(size)
    return path


class TestRawOverFile(DriverContract):
    driver = "raw"
    persistent = True
    discard_reads_zero = True  # forwarded to file, which punches a hole
    invalid_options = {"offset": "-1", "size": "nope", "file.locking": "maybe"}

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        return {"file": {"driver": "file", "filename": str(sparse_image(tmp_path, size))}}


class TestRawWindow(DriverContract):
    """offset/size select [64 KiB, 64 KiB + size) of a larger file; a fixed-size window cannot be resized."""

    driver = "raw"
    persistent = True
    discard_reads_zero = True
    supports_truncate = False

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        path = sparse_image(tmp_path, size + 2 * WINDOW)
        return {"offset": WINDOW, "size": size, "file": {"driver": "file", "filename": str(path)}}


class TestRawOverNull(DriverContract):
    driver = "raw"
    stores_data = False
    supports_truncate = False  # raw resizes its file, and null-co cannot be resized

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        return {"file": {"driver": "null-co", "size": size, "read-zeroes": "on"}}


def test_window_never_touches_the_rest_of_the_file(tmp_path: Path) -> None:
    """Writes, zeroes, discards and block status through a window stay inside it."""
    size = 1 << 20
    outside = b"\xa5" * WINDOW
    path = sparse_image(tmp_path, size + 2 * WINDOW, outside + bytes(size) + outside)

    async def scribble() -> None:
        session = Session()
        try:
            node = await session.open_node({"driver": "raw", "offset": WINDOW, "size": size,
                                            "file": {"driver": "file", "filename": str(path)}, "discard": "unmap"})
            blk = await BlockBackend.attach_new(session, node)
            await blk.pwritev(0, memoryview(b"\x11" * 4097))
            await blk.pwritev(size - 4097, memoryview(b"\x22" * 4097))
            await blk.pwrite_zeroes(0, 8192)
            await blk.pwrite_zeroes(size - 8192, 8192)
            await blk.pdiscard(0, size)
            await blk.flush()
        finally:
            await session.close()

    asyncio.run(scribble())
    data = path.read_bytes()
    assert data[:WINDOW] == outside
    assert data[WINDOW + size:] == outside
    assert len(data) == size + 2 * WINDOW
