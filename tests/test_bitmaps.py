"""Dirty bitmaps in the core: bit arithmetic, extents, merge, and marking by the generic I/O layer."""

from __future__ import annotations

import random
from typing import Any

import pytest
from blockgraph import bitmaps, io
from blockgraph.bitmaps import BitmapError, DirtyBitmap


def dirty_runs(bm: DirtyBitmap) -> list[tuple[int, int]]:
    return [(s, n) for s, n, d in bm.extents(0, bm.size) if d]


def test_set_marks_every_touched_granule() -> None:
    bm = DirtyBitmap("b", 512, 100 * 512)
    bm.set(513, 1)
    bm.set(5000, 2000)
    assert dirty_runs(bm) == [(512, 512), (4608, 2560)]
    assert bm.count() == 512 + 2560
    assert bm.get(512) and not bm.get(0) and bm.get(7167) and not bm.get(7168)


def test_extents_cover_the_range_alternately() -> None:
    bm = DirtyBitmap("b", 4096, 1 << 20)
    bm.set(8192, 4096)
    runs = list(bm.extents(4096, 12288))
    assert runs == [(4096, 4096, False), (8192, 4096, True), (12288, 4096, False)]


def test_against_a_model() -> None:
    rnd = random.Random(6)
    gran, size = 1024, 300 * 1024 + 100
    bm = DirtyBitmap("m", gran, size)
    model = [False] * (-(-size // gran))
    for _ in range(300):
        off = rnd.randrange(size)
        n = rnd.randrange(1, 40000)
        if rnd.random() < 0.7:
            bm.set(off, n)
            for g in range(off // gran, -(-min(off + n, size) // gran)):
                model[g] = True
        else:
            bm.reset(off - off % gran, n - n % gran + gran)
            end = min(off - off % gran + n - n % gran + gran, size)
            for g in range((off - off % gran) // gran, -(-end // gran)):
                model[g] = False
        got = [False] * len(model)
        for s, length, d in bm.extents(0, size):
            for g in range(s // gran, -(-(s + length) // gran)):
                got[g] = d
        assert got == model
        assert bm.count() == sum(model) * gran


def test_merge_same_and_different_granularity() -> None:
    a = DirtyBitmap("a", 512, 1 << 16)
    b = DirtyBitmap("b", 512, 1 << 16)
    c = DirtyBitmap("c", 4096, 1 << 16)
    b.set(1024, 512)
    c.set(8192, 1)
    a.merge(b)
    a.merge(c)
    assert dirty_runs(a) == [(1024, 512), (8192, 4096)]


def test_checks_use_qemu_texts() -> None:
    bm = DirtyBitmap("x", 65536, 1 << 20)
    bm.busy = True
    with pytest.raises(BitmapError, match=r"^Bitmap 'x' is currently in use by another operation and cannot be "
                                          r"used$"):
        bm.check()
    bm.busy, bm.readonly = False, True
    bm.check(allow_ro=True)
    with pytest.raises(BitmapError, match=r"^Bitmap 'x' is readonly and cannot be modified$"):
        bm.check()
    bm.readonly, bm.inconsistent, bm.enabled = False, True, False
    with pytest.raises(BitmapError, match=r"^Bitmap 'x' is inconsistent and cannot be used$"):
        bm.check(allow_ro=True)
    assert bm.info()["inconsistent"] is True and bm.info()["recording"] is False


def test_memory_is_one_bit_per_granule() -> None:
    bm = DirtyBitmap("big", 65536, 1 << 40)
    assert len(bm.bits) == (1 << 40) // 65536 // 8


@pytest.fixture
def node(tsession: Any, bg_runner: Any) -> Any:
    return bg_runner.run(tsession.open_node({"driver": "null-co", "node-name": "n", "size": 1 << 20}))


def test_io_layer_marks_writes_zeroes_and_discards(node: Any, bg_runner: Any) -> None:
    run = bg_runner.run
    on = bitmaps.create(node, "on", 4096)
    off = bitmaps.create(node, "off", 65536, enabled=False)
    assert node.dirty_bitmaps == [off, on]  # newest first, as QEMU lists them
    assert bitmaps.default_granularity(node) == 65536
    run(io.pwritev(node, 5000, memoryview(b"x" * 10)))
    run(io.pwrite_zeroes(node, 65536, 8192))
    assert dirty_runs(on) == [(4096, 4096), (65536, 8192)]
    assert off.count() == 0
    with pytest.raises(BitmapError, match=r"^Bitmap already exists: on$"):
        bitmaps.create(node, "on")


def test_reads_do_not_mark(node: Any, bg_runner: Any) -> None:
    bm = bitmaps.create(node, "r", 512)
    bg_runner.run(io.preadv(node, 0, memoryview(bytearray(4096))))
    assert bm.count() == 0
