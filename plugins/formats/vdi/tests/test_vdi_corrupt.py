"""Corrupt VDIs (mutated header and block map): a clear error or data, never a crash, hang or write."""

from __future__ import annotations

import hashlib
from pathlib import Path

from blockgraph.backend import BlockBackend
from blockgraph.driver import CheckFix
from blockgraph.errors import BlockGraphError
from blockgraph.session import Session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vdi_helpers import arun, create, write_at

MiB = 1 << 20
READ_LIMIT = 8 * MiB
TEMPLATE: list[bytes] = []


def _template(tmp: Path) -> bytes:
    if not TEMPLATE:
        path = tmp / "t.vdi"
        create(path, 4 * MiB)
        write_at(path, [(0, b"\x11" * 4096), (2 * MiB + 512, b"\x22" * 1024)])
        TEMPLATE.append(path.read_bytes())
    return TEMPLATE[0]


async def _exercise(path: Path) -> None:
    session = Session()
    try:
        node = await session.open_node({"driver": "vdi", "read-only": True,
                                        "file": {"driver": "file", "filename": str(path)}})
        blk = await BlockBackend.attach_new(session, node, read_only=True)
        size = blk.getlength()
        buf = bytearray(min(size, READ_LIMIT))
        if buf:
            await blk.preadv(0, memoryview(buf))
        pos = 0
        for _ in range(64):
            if pos >= size:
                break
            stat, _depth = await blk.block_status(pos, size - pos)
            assert stat.length > 0
            pos += stat.length
        res = node.driver.check(CheckFix.NONE)
        assert res.corruptions == len(res.messages)
    finally:
        await session.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(muts=st.lists(st.tuples(st.integers(0, 512 + 16), st.integers(0, 255)), min_size=1, max_size=4))
def test_header_and_block_map_mutations(tmp_path: Path, muts: list[tuple[int, int]]) -> None:
    data = bytearray(_template(tmp_path))
    for at, value in muts:
        data[at] = value
    path = tmp_path / "mutant.vdi"
    path.write_bytes(bytes(data))
    before = hashlib.sha256(data).digest()
    try:
        arun(_exercise(path))
    except BlockGraphError as e:
        assert str(e)
    assert hashlib.sha256(path.read_bytes()).digest() == before, "a read-only open changed the image"


def test_block_map_past_the_end_of_the_file(tmp_path: Path) -> None:
    data = bytearray(_template(tmp_path))
    data[384:388] = (1 << 24).to_bytes(4, "little")  # blocks_in_image: a block map far longer than the file
    path = tmp_path / "short.vdi"
    path.write_bytes(bytes(data))
    try:
        arun(_exercise(path))
    except BlockGraphError as e:
        assert "block map" in str(e) and "offset 512" in str(e)
    else:
        raise AssertionError("a block map past the end of the file was accepted")


def test_entry_beyond_the_image_is_an_io_error(tmp_path: Path) -> None:
    data = bytearray(_template(tmp_path))
    data[512:516] = (1000).to_bytes(4, "little")
    path = tmp_path / "far.vdi"
    path.write_bytes(bytes(data))
    try:
        arun(_exercise(path))
    except BlockGraphError as e:
        assert "block map entry 0 points to block 1000" in str(e)
    else:
        raise AssertionError("a block map entry beyond the image was read")
