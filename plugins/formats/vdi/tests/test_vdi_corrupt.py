"""Corrupt VDIs (mutated header and block map): a clear error or data, never a crash, hang or write."""

from __future__ import annotations

from pathlib import Path

from blockgraph.driver import CheckFix
from blockgraph.testing.corrupt import refused, survives
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vdi_helpers import create, write_at

MiB = 1 << 20
TEMPLATE: list[bytes] = []


def _template(tmp: Path) -> bytes:
    if not TEMPLATE:
        path = tmp / "t.vdi"
        create(path, 4 * MiB)
        write_at(path, [(0, b"\x11" * 4096), (2 * MiB + 512, b"\x22" * 1024)])
        TEMPLATE.append(path.read_bytes())
    return TEMPLATE[0]


def _check_consistent(node: object) -> None:
    res = node.driver.check(CheckFix.NONE)  # type: ignore[attr-defined]
    assert res.corruptions == len(res.messages)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(muts=st.lists(st.tuples(st.integers(0, 512 + 16), st.integers(0, 255)), min_size=1, max_size=4))
def test_header_and_block_map_mutations(tmp_path: Path, muts: list[tuple[int, int]]) -> None:
    data = bytearray(_template(tmp_path))
    for at, value in muts:
        data[at] = value
    survives(tmp_path / "mutant.vdi", bytes(data), "vdi", after=_check_consistent)


def test_block_map_past_the_end_of_the_file(tmp_path: Path) -> None:
    data = bytearray(_template(tmp_path))
    data[384:388] = (1 << 24).to_bytes(4, "little")  # blocks_in_image: a block map far longer than the file
    refused(tmp_path / "short.vdi", bytes(data), "vdi", "block map", "offset 512")


def test_entry_beyond_the_image_is_an_io_error(tmp_path: Path) -> None:
    data = bytearray(_template(tmp_path))
    data[512:516] = (1000).to_bytes(4, "little")
    refused(tmp_path / "far.vdi", bytes(data), "vdi", "block map entry 0 points to block 1000")
