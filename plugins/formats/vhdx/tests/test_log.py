"""Dirty logs: an image whose last BAT update reached the log but not its place, as after a crash.

Both tools leave their last log entry in the log region after emptying the log (they only clear the log GUID
in the headers), so putting that GUID back and undoing the in-place update recreates the state a crash
between the two steps leaves. Each tool must then replay the other's entry.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from blockgraph_vhdx.structs import (
    HEADER_OFFSETS,
    HEADER_SIZE,
    LOG_DESCRIPTOR,
    LOG_ENTRY_HEADER,
    Header,
    LogEntryHeader,
)
from vhdx_helpers import bg, needs_qemu, run

MiB = 1 << 20


def crash_before_in_place_write(path: Path) -> int:
    """Undo the in-place write of the last logged sector and mark the log dirty again; returns its offset."""
    with open(path, "r+b") as f:
        headers = []
        for off in HEADER_OFFSETS:
            f.seek(off)
            raw = f.read(HEADER_SIZE)
            headers.append((off, raw, Header.parse(raw)))
        _, _, cur = max(headers, key=lambda h: h[2].sequence_number)
        f.seek(cur.log_offset)
        entry = f.read(2 * 4096)
        hdr = LogEntryHeader.parse(entry)
        assert hdr is not None and hdr.descriptor_count == 1
        sig, _, _, sector_off, _ = LOG_DESCRIPTOR.unpack_from(entry, LOG_ENTRY_HEADER.size)
        assert sig == b"desc"
        f.seek(sector_off)
        f.write(bytes(4096))  # the BAT sector as it was before (no block allocated in it yet)
        for off, raw, h in headers:
            h.log_guid = hdr.log_guid
            f.seek(off)
            f.write(h.pack(raw))
    return sector_off


def _writer(tool: str, img: Path) -> None:
    cmd = ["-c", "write -P 0x66 1M 64k"]
    if tool == "qemu":
        run("qemu-io", "-f", "vhdx", *cmd, img)
    else:
        bg("io", "-f", "vhdx", *cmd, img)


@needs_qemu
@pytest.mark.parametrize("writer", ["qemu", "blockgraph"])
def test_each_tool_replays_the_others_log(tmp_path: Path, writer: str) -> None:
    img = tmp_path / "d.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", img, "8M")
    _writer(writer, img)
    crash_before_in_place_write(img)
    for_qemu, for_us = tmp_path / "q.vhdx", tmp_path / "b.vhdx"
    shutil.copy(img, for_qemu)
    shutil.copy(img, for_us)

    # Read-only opens refuse: the log must be replayed first.
    ro = run("qemu-io", "-r", "-f", "vhdx", "-c", "read 0 512", img, ok=False)
    assert "contains a log that needs to be replayed" in ro.stderr
    ours = bg("io", "-r", "-f", "vhdx", "-c", "read 0 512", img, ok=False)
    assert ours.returncode != 0 and "contains a log that needs to be replayed" in ours.stderr
    assert "img check -r all" in ours.stderr

    run("qemu-img", "check", "-r", "all", "-f", "vhdx", for_qemu)
    bg("io", "-f", "vhdx", "-c", "read -P 0x66 1M 64k", for_us)  # a read-write open replays
    for img_ in (for_qemu, for_us):
        out = run("qemu-io", "-r", "-f", "vhdx", "-c", "read -P 0x66 1M 64k", "-c", "read -P 0 0 1M", img_)
        assert "Pattern verification failed" not in out.stdout
        assert "No errors were found" in run("qemu-img", "check", "-f", "vhdx", img_).stdout


@needs_qemu
def test_check_repair_reports_the_replay_as_qemu_img_does(tmp_path: Path) -> None:
    img, theirs = tmp_path / "d.vhdx", tmp_path / "t.vhdx"
    bg("img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", img, "8M")
    _writer("blockgraph", img)
    crash_before_in_place_write(img)
    shutil.copy(img, theirs)
    want = run("qemu-img", "check", "-r", "all", "-f", "vhdx", theirs, ok=False)
    got = bg("img", "check", "-r", "all", "-f", "vhdx", img, ok=False)
    assert "corruptions" in want.stdout
    assert got.returncode == want.returncode
    assert got.stdout.replace(str(img), "X") == want.stdout.replace(str(theirs), "X")


def test_a_truncated_log_entry_is_not_replayed(tmp_path: Path) -> None:
    """A torn log write (bad checksum) means the crash came before the log was stable: nothing to replay."""
    img = tmp_path / "d.vhdx"
    bg("img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", img, "8M")
    _writer("blockgraph", img)
    sector = crash_before_in_place_write(img)
    with open(img, "r+b") as f:
        f.seek(MiB + 4096 + 100)  # inside the entry's data sector
        f.write(b"torn")
    out = bg("io", "-r", "-f", "vhdx", "-c", "read -P 0 1M 64k", img)  # opens: no valid entry, nothing to do
    assert "Pattern verification failed" not in out.stdout
    with open(img, "rb") as f:
        f.seek(sector)
        assert struct.unpack("<Q", f.read(8))[0] == 0
