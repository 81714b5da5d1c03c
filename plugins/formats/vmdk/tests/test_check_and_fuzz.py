"""The check hook (QEMU's vmdk_co_check) and mutated images: a clear error or the right data, never a crash or write."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest
from blockgraph.driver import CheckFix
from blockgraph.errors import BlockGraphError, NotSupported
from blockgraph.session import Session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmdk_helpers import BLOCKGRAPH, QEMU_IMG, bg_create, needs_qemu, open_blk, run

SIZE = 1 << 20


def _image(tmp_path: Path, name: str = "d.vmdk", **opts: str) -> Path:
    path = tmp_path / name
    bg_create(path, SIZE, **opts)

    async def fill() -> None:
        session = Session()
        try:
            blk = await open_blk(session, path)
            await blk.pwritev(0, memoryview(b"\x5a" * 70000))
            await blk.pwritev(SIZE - 4096, memoryview(b"\xa5" * 4096))
        finally:
            await session.close()

    asyncio.run(fill())
    return path


async def _check(path: Path, fix: CheckFix = CheckFix.NONE):
    session = Session()
    try:
        blk = await open_blk(session, path, read_only=True)
        return await blk.node.driver.check(fix)
    finally:
        await session.close()


def test_check_clean(tmp_path: Path) -> None:
    result = asyncio.run(_check(_image(tmp_path)))
    assert (result.corruptions, result.leaks, result.check_errors, result.messages) == (0, 0, 0, [])


def test_check_does_not_repair(tmp_path: Path) -> None:
    with pytest.raises(NotSupported, match="does not support checks"):
        asyncio.run(_check(_image(tmp_path), CheckFix.LEAKS))


def _gte_past_eof(path: Path) -> None:
    raw = path.read_bytes()
    gd = struct.unpack_from("<Q", raw, 56)[0]
    gt = struct.unpack_from("<I", raw, gd * 512)[0]
    with open(path, "r+b") as f:
        f.seek(gt * 512 + 4)
        f.write(struct.pack("<I", 999999))


def test_check_finds_a_grain_after_eof(tmp_path: Path) -> None:
    path = _image(tmp_path)
    _gte_past_eof(path)
    with pytest.raises(BlockGraphError) as exc:
        asyncio.run(_check(path))
    assert exc.value.errno == 22
    assert exc.value.result.corruptions == 1
    assert exc.value.result.messages == ["ERROR: cluster offset for sector 128 points after EOF"]


@needs_qemu
def test_check_messages_are_qemus(tmp_path: Path) -> None:
    path = _image(tmp_path)
    _gte_past_eof(path)
    res = run(QEMU_IMG, "check", path, check=False)
    assert res.returncode == 1
    with pytest.raises(BlockGraphError) as exc:
        asyncio.run(_check(path))
    assert res.stderr.splitlines()[0] == exc.value.result.messages[0]
    ours = run(BLOCKGRAPH, "img", "check", path, check=False)
    assert (ours.returncode, ours.stdout, ours.stderr) == (res.returncode, res.stdout, res.stderr)
    clean = _image(tmp_path, "clean.vmdk")
    for argv in (["check", clean], ["check", "--output=json", clean], ["check", "-r", "all", clean]):
        theirs = run(QEMU_IMG, *argv, check=False)
        ours = run(BLOCKGRAPH, "img", *argv, check=False)
        assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)


# ------------------------------------------------------------ mutations


def _read_everything(path: Path, timeout: float = 20.0) -> None:
    """Open read-only, read the whole disk and its block status; any BlockGraphError is a fine answer."""

    async def go() -> None:
        session = Session()
        try:
            blk = await open_blk(session, path, read_only=True)
            length = blk.getlength()
            head = bytearray(min(length, 2 << 20))
            await blk.preadv(0, memoryview(head))
            tail = bytearray(min(length, 65536))
            await blk.preadv(length - len(tail), memoryview(tail))
            off = 0
            for _ in range(2000):  # a mutated capacity may make the disk huge: look at its start
                if off >= length:
                    break
                stat, _depth = await blk.block_status(off, length - off)
                assert stat.length > 0
                off += stat.length
        except BlockGraphError:
            pass
        finally:
            await session.close()

    asyncio.run(asyncio.wait_for(go(), timeout))


def _mutate(path: Path, edits: list[tuple[int, int]]) -> bytes:
    raw = bytearray(path.read_bytes())
    for pos, value in edits:
        raw[pos % len(raw)] = value
    path.write_bytes(raw)
    return bytes(raw)


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8)


_PRISTINE: dict[str, bytes] = {}


def pristine(tmp_path: Path, sub: str) -> bytes:
    """A small written image of subformat ``sub``, made once per test session."""
    if sub not in _PRISTINE:
        _PRISTINE[sub] = _image(tmp_path, f"pristine-{sub}.vmdk", subformat=sub).read_bytes()
    return _PRISTINE[sub]


@FUZZ
@given(sub=st.sampled_from(["monolithicSparse", "streamOptimized"]),
       edits=st.lists(st.tuples(st.integers(0, 2047), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_header_and_descriptor(tmp_path: Path, sub: str, edits: list[tuple[int, int]]) -> None:
    path = tmp_path / "m.vmdk"
    path.write_bytes(pristine(tmp_path, sub))
    mutated = _mutate(path, edits)
    _read_everything(path)
    assert path.read_bytes() == mutated  # a read-only open never writes


@FUZZ
@given(sub=st.sampled_from(["monolithicSparse", "streamOptimized"]), edits=EDITS)
def test_mutated_tables_and_grains(tmp_path: Path, sub: str, edits: list[tuple[int, int]]) -> None:
    path = tmp_path / "m.vmdk"
    raw = pristine(tmp_path, sub)
    path.write_bytes(raw)
    gd = struct.unpack_from("<Q", raw, 56)[0] * 512
    mutated = _mutate(path, [(10752 + pos % (len(raw) - 10752), v) if pos % 3 else (gd + pos % 512, v)
                             for pos, v in edits])
    _read_everything(path)
    assert path.read_bytes() == mutated


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list('RWFLATSPARSEZERO "x.raw0123456789\n=#DDBcreateTypeCIDv')),
                    max_size=300))
def test_mutated_descriptor_files(tmp_path: Path, text: str) -> None:
    (tmp_path / "x.raw").write_bytes(b"\x01" * 4096)
    path = tmp_path / "d.vmdk"
    path.write_text('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
                    + text)
    _read_everything(path)
    assert (tmp_path / "x.raw").read_bytes() == b"\x01" * 4096
