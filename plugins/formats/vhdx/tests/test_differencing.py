"""Differencing VHDX: a parent named by the parent locator, copy-on-write, and Hyper-V's partially present blocks.

qemu-img 7.2 neither creates nor reads differencing VHDX, so the expected data comes from raw files.
"""

from __future__ import annotations

import struct
from pathlib import Path

import blockgraph
import pytest
from blockgraph.errors import BlockGraphError
from blockgraph_vhdx.structs import PAYLOAD_PARTIALLY_PRESENT, SB_PRESENT, chunk_ratio
from vhdx_helpers import bg

MiB = 1 << 20


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    base, top = tmp_path / "base.vhdx", tmp_path / "top.vhdx"
    bg("img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", base, "4M")
    bg("io", "-c", "write -P 0x11 0 4M", base)
    bg("img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", "-b", "base.vhdx", "-F", "vhdx", top)
    return base, top


def test_reads_come_from_the_parent_until_written(chain: tuple[Path, Path]) -> None:
    base, top = chain
    bg("io", "-c", "write -P 0x22 1536k 4k", top)
    with blockgraph.open(str(top)) as img:
        assert img.read(0, MiB) == b"\x11" * MiB
        block = img.read(MiB, MiB)
        assert block[:512 * 1024] == b"\x11" * (512 * 1024)
        assert block[512 * 1024:512 * 1024 + 4096] == b"\x22" * 4096
        assert block[512 * 1024 + 4096:] == b"\x11" * (MiB - 512 * 1024 - 4096)
    with blockgraph.open(str(base)) as img:
        assert img.read(MiB, MiB) == b"\x11" * MiB  # the parent is never written


def test_info_names_the_parent(chain: tuple[Path, Path]) -> None:
    _, top = chain
    out = bg("img", "info", top).stdout
    assert "backing file: base.vhdx" in out


def test_parent_is_found_relative_to_the_image_not_the_cwd(chain: tuple[Path, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _, top = chain
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "base.vhdx").write_bytes(b"not the parent")
    monkeypatch.chdir(elsewhere)
    with blockgraph.open(str(top), read_only=True) as img:
        assert img.read(0, 4096) == b"\x11" * 4096


def test_missing_parent_is_a_clear_error(chain: tuple[Path, Path]) -> None:
    base, top = chain
    base.unlink()
    with pytest.raises(BlockGraphError, match=r"base\.vhdx"):
        blockgraph.open(str(top), read_only=True)


def _make_partially_present(top: Path, present_sectors: int) -> None:
    """Turn block 0 (fully present) into a partially present block whose first sectors are present."""
    with open(top, "r+b") as f:
        data = f.read()
        bat_off = struct.unpack_from("<Q", data, 192 * 1024 + 16 + 16)[0]
        entry = struct.unpack_from("<Q", data, bat_off)[0]
        sb_off = (len(data) + MiB - 1) // MiB * MiB
        bitmap = bytearray(MiB)
        for bit in range(present_sectors):
            bitmap[bit >> 3] |= 1 << (bit & 7)
        f.seek(sb_off)
        f.write(bitmap)
        ratio = chunk_ratio(MiB, 512)
        f.seek(bat_off + ratio * 8)
        f.write(struct.pack("<Q", sb_off | SB_PRESENT))
        f.seek(bat_off)
        f.write(struct.pack("<Q", (entry & ~7) | PAYLOAD_PARTIALLY_PRESENT))


def test_partially_present_blocks_mix_own_sectors_and_parent(chain: tuple[Path, Path]) -> None:
    _, top = chain
    bg("io", "-c", "write -P 0x33 0 1M", top)
    _make_partially_present(top, present_sectors=8)
    with blockgraph.open(str(top)) as img:
        got = img.read(0, MiB)
        assert got[:4096] == b"\x33" * 4096 and got[4096:] == b"\x11" * (MiB - 4096)
        img.write(8192, b"\x44" * 1024)  # marks two more sectors present, through the log
    with blockgraph.open(str(top), read_only=True) as img:
        got = img.read(0, 16384)
        assert got[:4096] == b"\x33" * 4096
        assert got[4096:8192] == b"\x11" * 4096
        assert got[8192:9216] == b"\x44" * 1024
        assert got[9216:] == b"\x11" * (16384 - 9216)
