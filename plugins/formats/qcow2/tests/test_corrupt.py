"""Corrupt input: mutated headers, L1/L2 entries, refcount tables and compressed descriptors end in a clear
error or correct data, never a hang, a crash, or (read-only) any write to the image."""

from __future__ import annotations

import asyncio
import hashlib
import struct
import zlib
from pathlib import Path

import pytest
from blockgraph.backend import BlockBackend
from blockgraph.errors import BlockGraphError, ImageCorrupt, OpenError
from blockgraph.session import Session
from blockgraph_qcow2.testing import bg_create
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CS = 4096
SIZE = 1 << 20


def _base_image(tmp: Path) -> bytes:
    """A small image: data clusters, a zero cluster, and one compressed cluster written by hand."""
    from blockgraph import sync

    path = bg_create(tmp / "base.qcow2", SIZE, cluster_size=str(CS))
    with sync.open(str(path)) as img:
        img.write(0, b"\x11" * 10000)
        img.write(200000, b"\x22" * 5000)
        img.write_zeroes(400 * 1024, CS)
        img.write(600 * 1024, b"\x33" * CS)
    # Make guest cluster 150 compressed: raw deflate of a full cluster, appended at the end of the file.
    data = bytearray(path.read_bytes())
    l1_off = struct.unpack_from(">Q", data, 40)[0]
    l2_off = struct.unpack_from(">Q", data, l1_off)[0] & 0x00FFFFFFFFFFFE00
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    payload = c.compress(b"compressed!" * 372 + b"1234") + c.flush()
    host = len(data)
    data += payload + bytes(-len(payload) % 512)
    x = 62 - (12 - 8)
    nsec = ((host + len(payload) - 1) >> 9) - (host >> 9)
    struct.pack_into(">Q", data, l2_off + 8 * 150, (1 << 62) | (nsec << x) | host)
    return bytes(data)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _base_image(tmp_path_factory.mktemp("corrupt"))


def _locations(data: bytes) -> dict[str, tuple[int, int]]:
    """(offset, width) of interesting fields in ``data``."""
    l1_off = struct.unpack_from(">Q", data, 40)[0]
    rt_off = struct.unpack_from(">Q", data, 48)[0]
    l2_off = struct.unpack_from(">Q", data, l1_off)[0] & 0x00FFFFFFFFFFFE00
    rb_off = struct.unpack_from(">Q", data, rt_off)[0]
    return {
        "version": (4, 4), "backing_offset": (8, 8), "backing_size": (16, 4), "cluster_bits": (20, 4),
        "size": (24, 8), "crypt": (32, 4), "l1_size": (36, 4), "l1_offset": (40, 8), "rt_offset": (48, 8),
        "rt_clusters": (56, 4), "nb_snapshots": (60, 4), "snapshots_offset": (64, 8), "incompat": (72, 8),
        "autoclear": (88, 8), "refcount_order": (96, 4), "header_length": (100, 4), "compression": (104, 1),
        "ext_type": (112, 4), "ext_len": (116, 4),
        "l1_entry": (l1_off, 8), "l2_entry0": (l2_off, 8), "l2_entry48": (l2_off + 8 * 48, 8),
        "l2_compressed": (l2_off + 8 * 150, 8), "rt_entry0": (rt_off, 8), "refblock0": (rb_off, 8),
    }


async def _exercise(path: Path, read_only: bool) -> None:
    session = Session()
    try:
        node = await session.open_node({"driver": "qcow2", "read-only": read_only,
                                        "file": {"driver": "file", "filename": str(path), "read-only": read_only}})
        blk = await BlockBackend.attach_new(session, node)
        buf = bytearray(SIZE)
        try:
            await blk.preadv(0, memoryview(buf))
        except BlockGraphError:
            pass
        pos = 0
        while pos < node.length:  # block status walks the whole image in bounded steps
            try:
                st, _ = await blk.block_status(pos, node.length - pos)
            except BlockGraphError:
                break
            assert st.length > 0
            pos += st.length
        if not read_only:
            for off in (0, 200000, 150 * CS, 600 * 1024):
                try:
                    await blk.pwritev(off, memoryview(b"\x5a" * 6000))
                except BlockGraphError:
                    pass
            try:
                await blk.flush()
            except BlockGraphError:
                pass
    finally:
        await session.close()


def _run(path: Path, read_only: bool) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(_exercise(path, read_only), timeout=20)

    try:
        asyncio.run(bounded())
    except BlockGraphError:
        pass  # a clear error is fine; anything else (or a timeout) fails the test


FIELD = st.sampled_from(["version", "backing_offset", "backing_size", "cluster_bits", "size", "crypt", "l1_size",
                         "l1_offset", "rt_offset", "rt_clusters", "nb_snapshots", "snapshots_offset", "incompat",
                         "autoclear", "refcount_order", "header_length", "compression", "ext_type", "ext_len",
                         "l1_entry", "l2_entry0", "l2_entry48", "l2_compressed", "rt_entry0", "refblock0"])
VALUE = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2, 3, 9, 21, 22, 63, 64, 511, 512, 4096, 4097,
                                                               2**31, 2**32 - 1, 2**56, 2**62, 2**63, 2**64 - 1]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=FIELD, value=VALUE, other=st.tuples(FIELD, VALUE) | st.none())
def test_mutations_read_only(base: bytes, tmp_path: Path, field: str, value: int,
                             other: tuple[str, int] | None) -> None:
    data = bytearray(base)
    locs = _locations(base)
    for f, v in [(field, value), *([other] if other else [])]:
        off, width = locs[f]
        data[off:off + width] = (v % (1 << (8 * width))).to_bytes(width, "big")
    path = tmp_path / "m.qcow2"
    path.write_bytes(bytes(data))
    before = hashlib.sha256(bytes(data)).digest()
    _run(path, read_only=True)
    assert hashlib.sha256(path.read_bytes()).digest() == before, "a read-only open changed the image"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=FIELD, value=VALUE)
def test_mutations_read_write(base: bytes, tmp_path: Path, field: str, value: int) -> None:
    data = bytearray(base)
    off, width = _locations(base)[field]
    data[off:off + width] = (value % (1 << (8 * width))).to_bytes(width, "big")
    path = tmp_path / "m.qcow2"
    path.write_bytes(bytes(data))
    _run(path, read_only=False)
    assert path.stat().st_size < 64 << 20, "a corrupt image made the file grow without bound"


def test_unmutated_base_reads_correctly(base: bytes, tmp_path: Path) -> None:
    from blockgraph import sync

    path = tmp_path / "b.qcow2"
    path.write_bytes(base)
    with sync.open(str(path), read_only=True) as img:
        assert img.read(0, 10000) == b"\x11" * 10000
        assert img.read(150 * CS, CS) == (b"compressed!" * 372 + b"1234")
        assert img.read(400 * 1024, CS) == bytes(CS)


def _opened_error(data: bytes, tmp_path: Path, read_only: bool = True) -> str:
    path = tmp_path / "e.qcow2"
    path.write_bytes(data)
    with pytest.raises((OpenError, ImageCorrupt)) as e:
        asyncio.run(_exercise(path, read_only))
    return str(e.value)


def test_clear_errors(base: bytes, tmp_path: Path) -> None:
    locs = _locations(base)

    def mutate(field: str, value: int) -> bytes:
        d = bytearray(base)
        off, width = locs[field]
        d[off:off + width] = value.to_bytes(width, "big")
        return bytes(d)

    assert "Unsupported qcow2 feature(s): Unknown incompatible feature: 100" in \
        _opened_error(mutate("incompat", 1 << 8), tmp_path)
    assert "encrypted images are not supported yet" in _opened_error(mutate("crypt", 2), tmp_path)
    assert "Image is corrupt; cannot be opened read/write" in _opened_error(mutate("incompat", 2), tmp_path, False)
    assert "Active L1 table too large" in _opened_error(mutate("l1_size", 2**32 - 1), tmp_path)
    assert "Unsupported cluster size" in _opened_error(mutate("cluster_bits", 30), tmp_path)
    assert "Unsupported qcow2 version 4" in _opened_error(mutate("version", 4), tmp_path)
    # The feature name table names an unknown bit when the image has one (clusters > 4k carry it).
    big = bg_create(tmp_path / "big.qcow2", SIZE)
    d = bytearray(big.read_bytes())
    struct.pack_into(">Q", d, 72, 1 << 4 | 1 << 9)
    assert "Unsupported qcow2 feature(s): Unknown incompatible feature: 200" in _opened_error(bytes(d), tmp_path)
