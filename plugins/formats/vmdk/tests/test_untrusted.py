"""Hostile and broken images: extents that leave the image's directory, missing files, absurd tables."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path

import pytest
from blockgraph.errors import BlockGraphError, OpenError
from blockgraph.session import Session
from vmdk_helpers import BLOCKGRAPH, bg_create, bg_read_all, open_blk, run

SECRET = b"secret host data " * 64


def descriptor(*extent_lines: str, create_type: str = "monolithicFlat") -> str:
    return ("# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
            f'createType="{create_type}"\n\n# Extent description\n' + "".join(f"{x}\n" for x in extent_lines))


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """(image directory, a secret file next to it, outside it)."""
    images = tmp_path / "images"
    images.mkdir()
    secret = tmp_path / "secret.raw"
    secret.write_bytes(SECRET)
    return images, secret


def open_error(path: Path, **options: object) -> str:
    with pytest.raises(OpenError) as exc:
        bg_read_all(path, **options)
    return str(exc.value)


def test_absolute_extent_is_refused(layout: tuple[Path, Path]) -> None:
    images, secret = layout
    desc = images / "d.vmdk"
    desc.write_text(descriptor(f'RW 2 FLAT "{secret}" 0'))
    msg = open_error(desc)
    assert str(secret) in msg and "absolute" in msg and "x-allow-external-extents=on" in msg
    assert bg_read_all(desc, **{"x-allow-external-extents": "on"}) == SECRET[:1024]


def test_dotdot_escape_is_refused(layout: tuple[Path, Path]) -> None:
    images, _secret = layout
    desc = images / "d.vmdk"
    desc.write_text(descriptor('RW 2 FLAT "../secret.raw" 0'))
    assert "leaves the descriptor's directory" in open_error(desc)
    desc.write_text(descriptor('RW 2 FLAT "sub/../../secret.raw" 0'))
    assert "'sub/../../secret.raw'" in open_error(desc)


def test_symlink_escape_is_refused(layout: tuple[Path, Path]) -> None:
    images, secret = layout
    (images / "data.raw").symlink_to(secret)
    desc = images / "d.vmdk"
    desc.write_text(descriptor('RW 2 FLAT "data.raw" 0'))
    msg = open_error(desc)
    assert "data.raw" in msg and str(secret) in msg
    assert bg_read_all(desc, **{"x-allow-external-extents": "on"}) == SECRET[:1024]


def test_links_and_subdirectories_inside_are_fine(layout: tuple[Path, Path]) -> None:
    images, _secret = layout
    (images / "sub").mkdir()
    (images / "sub" / "real.raw").write_bytes(b"\x42" * 1024)
    (images / "alias.raw").symlink_to(images / "sub" / "real.raw")
    desc = images / "d.vmdk"
    desc.write_text(descriptor('RW 2 FLAT "sub/real.raw" 0', 'RW 2 FLAT "alias.raw" 0'))
    assert bg_read_all(desc) == b"\x42" * 2048


def test_extents_resolve_against_the_descriptor_not_the_cwd(layout: tuple[Path, Path], monkeypatch) -> None:
    images, _secret = layout
    (images / "d-flat.vmdk").write_bytes(b"\x07" * 1024)
    (images / "d.vmdk").write_text(descriptor('RW 2 FLAT "d-flat.vmdk" 0'))
    monkeypatch.chdir(layout[1].parent)
    assert bg_read_all(Path("images/d.vmdk")) == b"\x07" * 1024


def test_missing_extent_names_it(layout: tuple[Path, Path]) -> None:
    images, _secret = layout
    desc = images / "d.vmdk"
    desc.write_text(descriptor('RW 2048 SPARSE "d-s001.vmdk"', create_type="twoGbMaxExtentSparse"))
    msg = open_error(desc)
    assert "d-s001.vmdk" in msg


@pytest.mark.parametrize(("line", "why"), [
    ('RW 2 FLAT "x.raw"', "Invalid extent line"),
    ('RW 2 SPARSE "x.raw" 7', "Invalid extent line"),
    ('RW 2 VMFSRDM "x.raw"', "Unsupported extent type 'VMFSRDM'"),
    ('RW -5 FLAT "x.raw" 0', "Invalid extent line"),
])
def test_bad_extent_lines(layout: tuple[Path, Path], line: str, why: str) -> None:
    images, _secret = layout
    (images / "x.raw").write_bytes(bytes(1024))
    desc = images / "d.vmdk"
    desc.write_text(descriptor(line))
    assert why in open_error(desc)


def test_unsupported_create_type(layout: tuple[Path, Path]) -> None:
    desc = layout[0] / "d.vmdk"
    desc.write_text(descriptor('RW 2 FLAT "x.raw" 0', create_type="fullDevice"))
    assert "Unsupported image type 'fullDevice'" in open_error(desc)


def _patch(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


@pytest.mark.parametrize(("offset", "fmt", "value", "why"), [
    (44, "<I", 100000, "L2 table size too big"),
    (44, "<I", 0, "L1 entry size is invalid"),
    (20, "<Q", 0x400000, "Invalid granularity"),
    (12, "<Q", 1 << 62, "L1 size too big"),
    (12, "<Q", 1 << 40, "beyond the end of the file"),  # a directory far longer than the file
    (4, "<I", 4, "Unsupported VMDK version 4"),
    (64, "<Q", 1 << 30, "File truncated"),
])
def test_absurd_header_fields(tmp_path: Path, offset: int, fmt: str, value: int, why: str) -> None:
    path = tmp_path / "d.vmdk"
    bg_create(path, 1 << 20)
    _patch(path, offset, fmt, value)
    before = path.read_bytes()
    assert why in open_error(path)
    assert path.read_bytes() == before


def test_version3_uncompressed_is_read_only(tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    bg_create(path, 1 << 20)
    _patch(path, 4, "<I", 3)

    async def rw() -> None:
        session = Session()
        try:
            await open_blk(session, path)
        finally:
            await session.close()

    with pytest.raises(OpenError, match="VMDK version 3 must be read only"):
        asyncio.run(rw())
    assert bg_read_all(path) == bytes(1 << 20)


def test_grain_table_beyond_eof_is_an_io_error(tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    bg_create(path, 1 << 20)
    gd = struct.unpack_from("<Q", path.read_bytes(), 56)[0]
    _patch(path, gd * 512, "<I", 0x7FFFFFF0)
    with pytest.raises(BlockGraphError, match=r"grain table 0 .* beyond the end of the file"):
        bg_read_all(path)


def test_info_lists_every_external_reference(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    bg_create(base, 4 << 20)
    over = tmp_path / "over.vmdk"
    bg_create(over, 4 << 20, subformat="twoGbMaxExtentSparse", backing_file="base.vmdk", backing_fmt="vmdk")
    info = json.loads(run(BLOCKGRAPH, "img", "info", "--output=json", over).stdout)
    assert info["backing-filename"] == "base.vmdk"
    assert info["full-backing-filename"] == str(base)
    files = [e["filename"] for e in info["format-specific"]["data"]["extents"]]
    assert files == [str(tmp_path / "over-s001.vmdk")]
    human = run(BLOCKGRAPH, "img", "info", over).stdout
    assert "backing file: base.vmdk" in human and "filename: " + str(tmp_path / "over-s001.vmdk") in human


def test_refusal_reaches_the_cli(layout: tuple[Path, Path]) -> None:
    images, secret = layout
    desc = images / "d.vmdk"
    desc.write_text(descriptor(f'RW 2 FLAT "{secret}" 0'))
    res = run(BLOCKGRAPH, "img", "info", desc, check=False)
    assert res.returncode == 1 and str(secret) in res.stderr and "x-allow-external-extents" in res.stderr
    assert os.path.exists(secret)


def test_tables_pointing_at_the_header_are_not_written(tmp_path: Path) -> None:
    """A corrupt grain table entry or redundant table that points at the header makes writes fail, not clobber."""
    path = tmp_path / "d.vmdk"
    bg_create(path, 1 << 20)
    raw = path.read_bytes()
    gd, rgd = struct.unpack_from("<Q", raw, 56)[0], struct.unpack_from("<Q", raw, 48)[0]
    _patch(path, rgd * 512, "<I", 0)  # the redundant grain table of the first 32 MiB now "is" the header
    gt = struct.unpack_from("<I", raw, gd * 512)[0]
    _patch(path, gt * 512 + 4, "<I", 0)  # ... and keep grain 1 unallocated
    before = path.read_bytes()

    async def write(offset: int) -> None:
        session = Session()
        try:
            blk = await open_blk(session, path)
            await blk.pwritev(offset, memoryview(b"\x01" * 512))
        finally:
            await session.close()

    asyncio.run(write(65536))  # rgd entry 0 means "no redundant table": allowed
    _patch(path, rgd * 512, "<I", 1)
    with pytest.raises(BlockGraphError, match="overlaps the header"):
        asyncio.run(write(2 * 65536))
    assert path.read_bytes()[:512] == before[:512]
