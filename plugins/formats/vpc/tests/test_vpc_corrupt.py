"""Corrupt VHDs (mutated footer, dynamic header, BAT, bitmaps): a clear error or data, never a crash, hang or write."""

from __future__ import annotations

import struct
from pathlib import Path

from blockgraph.session import Session
from blockgraph.testing.corrupt import refused, survives
from blockgraph_vpc import format as fmt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vpc_helpers import arun, create, write_at

MiB = 1 << 20
TEMPLATES: dict[str, bytes] = {}


def _template(tmp: Path, subformat: str) -> bytes:
    if subformat not in TEMPLATES:
        path = tmp / f"t-{subformat}.vhd"
        create(path, 5 * MiB, subformat=subformat, force_size="on")
        write_at(path, [(0, b"\x11" * 4096), (2 * MiB + 512, b"\x22" * 1024), (5 * MiB - 512, b"\x33" * 512)])
        TEMPLATES[subformat] = path.read_bytes()
    return TEMPLATES[subformat]


def _fix_checksums(data: bytearray, fixed: bool) -> None:
    at = len(data) - 512 if fixed else 0
    footer = bytearray(data[at:at + 512])
    footer[64:68] = bytes(4)
    data[at + 64:at + 68] = struct.pack(">I", fmt.checksum(footer))
    if not fixed:
        data[-512:] = data[:512]
        dyn = bytearray(data[512:1536])
        dyn[36:40] = bytes(4)
        data[512 + 36:512 + 40] = struct.pack(">I", fmt.checksum(dyn))


def _check_mutant(tmp: Path, data: bytes) -> None:
    survives(tmp / "mutant.vhd", data, "vpc")


mutations = st.lists(st.tuples(st.integers(0, 2048 + 512), st.integers(0, 255)), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(muts=mutations, fix=st.booleans())
def test_dynamic_metadata_mutations(tmp_path: Path, muts: list[tuple[int, int]], fix: bool) -> None:
    data = bytearray(_template(tmp_path, "dynamic"))
    for at, value in muts:
        data[at] = value  # footer copy, dynamic header, BAT, first bitmap
    if fix:
        _fix_checksums(data, False)
    _check_mutant(tmp_path, bytes(data))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(muts=st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), min_size=1, max_size=4), fix=st.booleans())
def test_fixed_footer_mutations(tmp_path: Path, muts: list[tuple[int, int]], fix: bool) -> None:
    data = bytearray(_template(tmp_path, "fixed"))
    base = len(data) - 512
    for at, value in muts:
        data[base + at] = value
    if fix:
        _fix_checksums(data, True)
    _check_mutant(tmp_path, bytes(data))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(muts=st.lists(st.tuples(st.integers(512 + 64, 4096), st.integers(0, 255)), min_size=1, max_size=6))
def test_differencing_locator_mutations(tmp_path: Path, muts: list[tuple[int, int]]) -> None:
    """Parent name, locator table and locator data of a differencing disk over a real parent."""
    parent, child = tmp_path / "parent.vhd", tmp_path / "child.vhd"
    if not parent.exists():
        create(parent, 2 * MiB, force_size="on")
        arun(_make_diff(child, parent))
    data = bytearray(child.read_bytes() if "diff" not in TEMPLATES else TEMPLATES["diff"])
    TEMPLATES.setdefault("diff", bytes(data))
    for at, value in muts:
        if at < len(data) - 512:
            data[at] = value
    _fix_checksums(data, False)
    _check_mutant(tmp_path, bytes(data))


async def _make_diff(child: Path, parent: Path) -> None:
    from blockgraph_vpc.create import create_differencing

    session = Session()
    try:
        await create_differencing(session, str(child), str(parent))
    finally:
        await session.close()


def test_bat_entry_into_the_metadata_is_refused(tmp_path: Path) -> None:
    data = bytearray(_template(tmp_path, "dynamic"))
    data[1536:1540] = struct.pack(">I", 1)  # block 0 at sector 1: over the dynamic header
    refused(tmp_path / "bad.vhd", bytes(data), "vpc", "BAT entry 0", "offset 1536")


def test_truncated_image(tmp_path: Path) -> None:
    data = _template(tmp_path, "dynamic")
    refused(tmp_path / "short.vhd", data[:len(data) - 600 * 1024], "vpc", "truncated")
