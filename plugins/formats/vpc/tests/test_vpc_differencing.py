"""Differencing VHDs: parent locators (W2ru, W2ku, MacX, the header's name) resolved against the image's directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from blockgraph.errors import BlockGraphError
from blockgraph.session import Session
from blockgraph_vpc import format as fmt
from blockgraph_vpc.create import create_differencing
from vpc_helpers import arun, bg, create, read_all, write_at

MiB = 1 << 20
SIZE = 3 * MiB


def _diff(child: Path, parent: Path, locators: list[tuple[bytes, bytes]] | None = None) -> None:
    async def go() -> None:
        session = Session()
        try:
            await create_differencing(session, str(child), str(parent), locators)
        finally:
            await session.close()

    arun(go())


@pytest.fixture
def family(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """dir/parent.vhd with a pattern, dir/child.vhd over it with writes of its own; the expected disk."""
    d = tmp_path / "dir"
    d.mkdir()
    parent, child = d / "parent.vhd", d / "child.vhd"
    create(parent, SIZE, force_size="on")
    write_at(parent, [(0, b"\x11" * MiB), (2 * MiB, b"\x22" * 4096)])
    _diff(child, parent)
    write_at(child, [(512, b"\x33" * 1024), (MiB + 4096, b"\x44" * 8192)])
    want = bytearray(SIZE)
    want[:MiB] = b"\x11" * MiB
    want[2 * MiB:2 * MiB + 4096] = b"\x22" * 4096
    want[512:1536] = b"\x33" * 1024
    want[MiB + 4096:MiB + 12288] = b"\x44" * 8192
    return parent, child, bytes(want)


def test_reads_through_the_parent_sector_by_sector(family: tuple[Path, Path, bytes]) -> None:
    parent, child, want = family
    assert read_all(child) == want
    assert read_all(parent)[512:1536] == b"\x11" * 1024  # the parent is never written


def test_relative_locator_used_after_moving_both(family: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    """The absolute W2ku path is stale after the move; W2ru is resolved against the image, not the cwd."""
    _, child, want = family
    moved = tmp_path / "elsewhere"
    os.rename(child.parent, moved)
    proc = bg("img", "info", "--output=json", str(moved / "child.vhd"))
    info = json.loads(proc.stdout)
    assert info["backing-filename"] == "parent.vhd"
    assert info["full-backing-filename"] == str(moved / "parent.vhd")
    assert read_all(moved / "child.vhd") == want


def test_img_info_lists_the_parent(family: tuple[Path, Path, bytes]) -> None:
    _, child, _ = family
    out = bg("img", "info", str(child)).stdout
    assert f"backing file: parent.vhd (actual path: {child.parent / 'parent.vhd'})" in out
    assert "backing file format: vpc" in out
    info = json.loads(bg("img", "info", "--output=json", str(child)).stdout)
    refs = info["format-specific"]["data"]["parent-locators"]
    assert {"platform": "W2ru", "path": "parent.vhd"} in refs  # every external name the image holds
    assert {"platform": "W2ku", "path": str(child.parent / "parent.vhd")} in refs
    chain = json.loads(bg("img", "info", "--backing-chain", "--output=json", str(child)).stdout)
    assert [i["filename"] for i in chain][1] == str(child.parent / "parent.vhd")


def test_backing_null_reads_only_the_child(family: tuple[Path, Path, bytes]) -> None:
    _, child, _ = family
    data = read_all(child, extra={"backing": None})
    assert data[512:1536] == b"\x33" * 1024
    assert data[:512] == bytes(512) and data[2 * MiB:2 * MiB + 4096] == bytes(4096)


def test_map_shows_the_layers(family: tuple[Path, Path, bytes]) -> None:
    _, child, _ = family
    rows = json.loads(bg("img", "map", "--output=json", str(child)).stdout)
    by_start = {r["start"]: r for r in rows}
    assert by_start[0]["depth"] == 1 and by_start[512]["depth"] == 0 and by_start[1536]["depth"] == 1


@pytest.mark.parametrize("kind", ["w2ku-stale-basename", "macx", "header-name"])
def test_other_locators(tmp_path: Path, kind: str) -> None:
    parent, child = tmp_path / "p.vhd", tmp_path / "c.vhd"
    create(parent, SIZE, force_size="on")
    write_at(parent, [(4096, b"\x77" * 512)])
    if kind == "w2ku-stale-basename":
        locators = [(fmt.PLAT_W2KU, "C:\\Users\\someone\\p.vhd".encode("utf-16-le"))]
    elif kind == "macx":
        locators = [(fmt.PLAT_MACX, f"file://localhost{parent}".encode())]
    else:
        locators = []  # only the header's UTF-16 parent name, relative to the image
    _diff(child, parent, locators)
    assert read_all(child)[4096:4608] == b"\x77" * 512


def test_missing_parent_is_a_clear_error(tmp_path: Path) -> None:
    parent, child = tmp_path / "p.vhd", tmp_path / "c.vhd"
    create(parent, SIZE, force_size="on")
    _diff(child, parent)
    parent.unlink()
    proc = bg("img", "info", str(child), ok=False)
    assert proc.returncode == 1
    assert "Could not open the parent of differencing VHD" in proc.stderr and "p.vhd" in proc.stderr
    with pytest.raises(BlockGraphError):
        read_all(child)


def test_writes_never_reach_the_parent(family: tuple[Path, Path, bytes]) -> None:
    parent, child, _ = family
    before = parent.read_bytes()
    write_at(child, [(0, b"\x99" * SIZE)])
    assert parent.read_bytes() == before
    assert read_all(child) == b"\x99" * SIZE


def test_locators_cannot_name_json_or_urls(tmp_path: Path) -> None:
    """An untrusted image naming a json: tree or a URL gets only plain paths followed (here the header's name)."""
    parent, child, other = tmp_path / "p.vhd", tmp_path / "c.vhd", tmp_path / "other.raw"
    create(parent, SIZE, force_size="on")
    other.write_bytes(b"\x66" * SIZE)
    evil = f'json:{{"driver":"raw","file":{{"driver":"file","filename":"{other}"}}}}'
    _diff(child, parent, [(fmt.PLAT_W2RU, evil.encode("utf-16-le")),
                          (fmt.PLAT_MACX, b"nbd://127.0.0.1:1/x")])
    assert read_all(child) == bytes(SIZE)


def test_a_disk_naming_itself_as_parent_is_refused(tmp_path: Path) -> None:
    parent, child = tmp_path / "p.vhd", tmp_path / "c.vhd"
    create(parent, SIZE, force_size="on")
    _diff(child, parent, [(fmt.PLAT_W2RU, "c.vhd".encode("utf-16-le"))])
    data = bytearray(child.read_bytes())
    data[512 + 64:512 + 576] = "c.vhd".encode("utf-16-be").ljust(512, b"\0")  # the header's name too
    child.write_bytes(bytes(data))
    proc = bg("img", "info", str(child), ok=False)
    assert proc.returncode == 1 and "loops back" in proc.stderr


def test_dynamic_disk_honours_its_sector_bitmap(tmp_path: Path) -> None:
    """Sectors whose bitmap bit is clear are not in use (VHD specification): zeros, and not data in the map.

    QEMU ignores the bitmap; the images it writes always have every bit of a block set, so both read alike.
    """
    img = tmp_path / "d.vhd"
    create(img, SIZE, force_size="on")
    write_at(img, [(0, b"\x5a" * (2 * MiB))])
    data = bytearray(img.read_bytes())
    bat0 = int.from_bytes(data[1536:1540], "big") * 512
    data[bat0 + 1] = 0x00  # sectors 8..15 not in use
    img.write_bytes(bytes(data))
    got = read_all(img)
    assert got[:4096] == b"\x5a" * 4096 and got[4096:8192] == bytes(4096) and got[8192:2 * MiB] == b"\x5a" * (
        2 * MiB - 8192)
    rows = json.loads(bg("img", "map", "--output=json", str(img)).stdout)
    assert [(r["start"], r["data"]) for r in rows][:3] == [(0, True), (4096, False), (8192, True)]


@pytest.mark.parametrize("out_fmt", ["raw", "vdi", "vpc"])
def test_convert_flattens_the_chain(family: tuple[Path, Path, bytes], tmp_path: Path, out_fmt: str) -> None:
    _, child, want = family
    out = tmp_path / f"flat.{out_fmt}"
    bg("img", "convert", "-O", out_fmt, *(["-o", "force_size=on"] if out_fmt == "vpc" else []), str(child), str(out))
    assert read_all(out, fmt=out_fmt) == want


def test_locator_space_in_bytes_as_windows_writes_it(family: tuple[Path, Path, bytes]) -> None:
    """data_space is sectors by the specification but bytes in Windows' images; neither reading may fail."""
    _, child, want = family
    data = bytearray(child.read_bytes())
    for i in range(8):
        at = 512 + fmt.LOCATOR_AT + 24 * i
        if data[at:at + 4] != bytes(4):
            sectors = int.from_bytes(data[at + 4:at + 8], "big")
            data[at + 4:at + 8] = (sectors * 512).to_bytes(4, "big")
    child.write_bytes(bytes(data))
    assert read_all(child) == want
