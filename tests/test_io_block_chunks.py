"""``blockgraph.io.block_chunks``: the block splitter the block formats (vdi, vpc, vhdx) share."""

from __future__ import annotations

import pytest
from blockgraph.io import BlockChunk, block_chunks
from hypothesis import given
from hypothesis import strategies as st


def test_a_request_across_three_blocks() -> None:
    assert list(block_chunks(3000, 5000, 2048)) == [
        BlockChunk(pos=0, offset=3000, block=1, within=952, length=1096),
        BlockChunk(pos=1096, offset=4096, block=2, within=0, length=2048),
        BlockChunk(pos=3144, offset=6144, block=3, within=0, length=1856),
    ]


@pytest.mark.parametrize("offset,length", [(0, 0), (4096, 0)])
def test_an_empty_request_has_no_chunks(offset: int, length: int) -> None:
    assert list(block_chunks(offset, length, 512)) == []


@given(st.integers(0, 1 << 40), st.integers(0, 1 << 22), st.sampled_from([512, 4096, 1 << 20, 2 << 20]))
def test_chunks_tile_the_request_inside_blocks(offset: int, length: int, block_size: int) -> None:
    pos = 0
    for c in block_chunks(offset, length, block_size):
        assert (c.pos, c.offset) == (pos, offset + pos)
        assert c.block * block_size + c.within == c.offset and 0 <= c.within < block_size
        assert 0 < c.length <= block_size - c.within
        pos += c.length
    assert pos == length
