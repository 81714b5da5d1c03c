"""The synchronous facade: ``with blockgraph.open(path) as d: d.read(0, 4096)``."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import blockgraph
import pytest
from blockgraph.driver import Status
from blockgraph.errors import BlockIOError, OpenError


def test_read_write_flush_round_trip(bg_tmp_image: Any) -> None:
    path: Path = bg_tmp_image(size=1 << 20, data=b"\x42" * 8192)
    with blockgraph.open(str(path)) as d:
        assert (d.format, d.length) == ("raw", 1 << 20)
        assert d.read(0, 4096) == b"\x42" * 4096
        d.write(4096, b"hello")
        d.write(100000, memoryview(bytearray(b"mv" * 100)))
        d.flush()
        assert d.read(4094, 9) == b"\x42\x42hello\x42\x42"
        buf = bytearray(200)
        d.readinto(100000, buf)
        assert buf == b"mv" * 100
        d.write_zeroes(0, 4096)
        assert d.read(0, 4096) == bytes(4096)
    data = path.read_bytes()
    assert data[:4096] == bytes(4096) and data[4096:4101] == b"hello" and data[100000:100200] == b"mv" * 100


def test_truncate_discard_and_block_status(bg_tmp_image: Any) -> None:
    path: Path = bg_tmp_image(size=1 << 20)
    with blockgraph.open(str(path), "raw", options={"discard": "unmap"}) as d:
        d.write(0, b"\x01" * 65536)
        st = d.block_status(0, 1 << 20)
        assert st.flags & Status.DATA and st.length == 65536
        d.discard(0, 65536)
        assert d.read(0, 512) == bytes(512)
        assert d.block_status(0, 1 << 20).flags & Status.ZERO
        d.truncate(2 << 20)
        assert d.length == 2 << 20
        assert d.block_status(1 << 20, 1 << 20).flags & Status.EOF
    assert path.stat().st_size == 2 << 20


def test_read_only_and_out_of_range(bg_tmp_image: Any) -> None:
    path: Path = bg_tmp_image(size=65536)
    with blockgraph.open(str(path), "raw", read_only=True) as d:
        with pytest.raises(BlockIOError) as info:
            d.write(0, b"x")
        assert info.value.errno == errno.EPERM
        with pytest.raises(BlockIOError) as info:
            d.read(65000, 1000)
        assert info.value.errno == errno.EIO
    assert path.read_bytes() == bytes(65536)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OpenError, match=r"Could not open '.*nope\.img': No such file or directory"):
        blockgraph.open(str(tmp_path / "nope.img"))


def test_close_is_idempotent_and_releases_the_image(bg_tmp_image: Any) -> None:
    path: Path = bg_tmp_image(size=65536)
    d = blockgraph.open(str(path), "raw")
    d.write(0, b"abc")
    d.close()
    d.close()
    assert d.session is None
    with blockgraph.open(str(path), "raw") as again:  # nothing of the first one stays locked
        assert again.read(0, 3) == b"abc"


def test_two_writers_share_like_qemu_io(bg_tmp_image: Any) -> None:
    path: Path = bg_tmp_image(size=65536)
    with blockgraph.open(str(path), "raw") as a, blockgraph.open(str(path), "raw") as b:
        a.write(0, b"A")
        b.write(1, b"B")
        a.flush()
        b.flush()
    assert path.read_bytes()[:2] == b"AB"


def test_not_usable_inside_a_running_loop(bg_tmp_image: Any) -> None:
    path: Path = bg_tmp_image(size=65536)

    async def inside() -> None:
        blockgraph.open(str(path), "raw")

    with pytest.raises(RuntimeError, match="running event loop"):
        asyncio.run(inside())
