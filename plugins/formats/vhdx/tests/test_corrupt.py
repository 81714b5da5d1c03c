"""Corrupt VHDX images: every mutation ends in a clear error or in reads that work, never a hang, a crash or a
write to an image opened read-only."""

from __future__ import annotations

import asyncio
import hashlib
import struct
from pathlib import Path

import pytest
from blockgraph.errors import BlockGraphError
from blockgraph.session import Session
from blockgraph_vhdx.structs import HEADER_OFFSETS, HEADER_SIZE, Header, seal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vhdx_helpers import bg

MiB = 1 << 20
# (offset, length) of the structures worth mutating in the template image made below.
AREAS = {"file id": (0, 16), "header 1": (64 * 1024, 80), "header 2": (128 * 1024, 80),
         "region table": (192 * 1024, 80), "log": (MiB, 8192), "bat": (2 * MiB, 64),
         "metadata": (3 * MiB, 256), "metadata items": (3 * MiB + 64 * 1024, 48)}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("vhdx") / "t.vhdx"
    bg("img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "4M")
    bg("io", "-c", "write -P 0x5a 0 1536k", path)
    return path.read_bytes()


async def _open_and_read(path: Path) -> None:
    session = Session()
    try:
        node = await session.open_image(str(path), fmt="vhdx", read_only=True)
        buf = bytearray(64 * 1024)
        for off in range(0, node.length, 1 << 19):
            from blockgraph import io

            await io.preadv(node, off, memoryview(buf)[:min(len(buf), node.length - off)])
    finally:
        await session.close()


def _try(path: Path) -> None:
    try:
        asyncio.run(asyncio.wait_for(_open_and_read(path), 20))  # the guard against hangs, not a timing check
    except BlockGraphError as e:
        assert str(e)  # a clear message, whatever it is
    except TimeoutError:
        pytest.fail("opening or reading a corrupt image hung")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(area=st.sampled_from(sorted(AREAS)), pos=st.integers(0, 1 << 16), value=st.binary(min_size=1, max_size=8),
       reseal=st.booleans())
def test_mutations_never_crash_hang_or_write(tmp_path: Path, template: bytes, area: str, pos: int, value: bytes,
                                             reseal: bool) -> None:
    start, length = AREAS[area]
    data = bytearray(template)
    at = start + pos % length
    data[at:at + len(value)] = value
    if reseal and area.startswith("header"):
        off = HEADER_OFFSETS[0 if area == "header 1" else 1]
        sector = data[off:off + HEADER_SIZE]
        seal(sector)  # a checksum that matches: the mutation reaches the parser
        data[off:off + HEADER_SIZE] = sector
    path = tmp_path / "m.vhdx"
    path.write_bytes(data)
    before = hashlib.sha256(data).hexdigest()
    _try(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def _with_bat_entry(template: bytes, entry: int) -> bytes:
    data = bytearray(template)
    struct.pack_into("<Q", data, 2 * MiB, entry)
    return bytes(data)


@pytest.mark.parametrize(("entry", "message"), [
    ((1 << 40) | 6, "points after end of file"),
    ((64 * 1024) | 6, "points into the header section"),
])
def test_bad_bat_entries_are_named(tmp_path: Path, template: bytes, entry: int, message: str) -> None:
    path = tmp_path / "b.vhdx"
    path.write_bytes(_with_bat_entry(template, entry))
    with pytest.raises(BlockGraphError, match=message):
        asyncio.run(_open_and_read(path))


def test_both_headers_bad_is_named(tmp_path: Path, template: bytes) -> None:
    data = bytearray(template)
    for off in HEADER_OFFSETS:
        data[off + 20] ^= 0xFF
    path = tmp_path / "h.vhdx"
    path.write_bytes(data)
    with pytest.raises(BlockGraphError, match="No valid VHDX header found"):
        asyncio.run(_open_and_read(path))


def test_one_bad_header_falls_back_to_the_other(tmp_path: Path, template: bytes) -> None:
    data = bytearray(template)
    seqs = [Header.parse(data[o:o + HEADER_SIZE]).sequence_number for o in HEADER_OFFSETS]
    newest = HEADER_OFFSETS[seqs.index(max(seqs))]
    data[newest + 20] ^= 0xFF
    path = tmp_path / "h.vhdx"
    path.write_bytes(data)
    asyncio.run(_open_and_read(path))  # opens with the older header
