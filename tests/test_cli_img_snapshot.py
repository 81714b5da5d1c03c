"""``blockgraph img snapshot``: -l table (qemu-img 7.2's columns), -c/-a/-d through the driver hooks, errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers_img import Result, img, make_image
from helpers_pcow import pimg

MiB = 1 << 20
HEADER = "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT"
ROW = re.compile(r"^(\S+)\s+(\S+)\s+0 B \d{4}-\d\d-\d\d \d\d:\d\d:\d\d 00:00:00\.000          0$")


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_image(Path("r.img"), MiB)
    assert pimg("create", "-q", "-f", "pcow", "a.pc", "1M").rc == 0


def test_create_list_apply_delete() -> None:
    assert pimg("snapshot", "-l", "a.pc") == Result(0, "", "")
    assert pimg("snapshot", "-c", "first", "a.pc") == Result(0, "", "")
    assert pimg("snapshot", "-c", "second", "a.pc") == Result(0, "", "")
    lines = pimg("snapshot", "-l", "a.pc").out.splitlines()
    assert lines[:2] == ["Snapshot list:", HEADER]
    assert [ROW.match(line).groups() for line in lines[2:]] == [("1", "first"), ("2", "second")]
    assert len(lines[2]) == len(HEADER)
    assert pimg("snapshot", "-a", "second", "a.pc") == Result(0, "", "")
    assert pimg("snapshot", "-a", "1", "a.pc") == Result(0, "", "")
    assert pimg("snapshot", "-d", "1", "a.pc") == Result(0, "", "")
    lines = pimg("snapshot", "-l", "a.pc").out.splitlines()
    assert [ROW.match(line).groups() for line in lines[2:]] == [("2", "second")]
    assert pimg("snapshot", "-d", "second", "a.pc") == Result(0, "", "")
    assert pimg("snapshot", "-l", "a.pc").out == ""


def test_info_lists_snapshots() -> None:
    assert pimg("snapshot", "-c", "s", "a.pc").rc == 0
    out = pimg("info", "a.pc").out.splitlines()
    i = out.index("Snapshot list:")
    assert out[i + 1] == HEADER and ROW.match(out[i + 2]).groups() == ("1", "s")


def test_missing_snapshot() -> None:
    assert pimg("snapshot", "-a", "nope", "a.pc") == Result(
        1, "", "qemu-img: Could not apply snapshot 'nope': Failed to load snapshot: No such file or directory\n")
    assert pimg("snapshot", "-d", "nope", "a.pc") == Result(
        1, "", "qemu-img: Could not delete snapshot 'nope': snapshot not found\n")


def test_raw_has_no_snapshots() -> None:
    assert img("snapshot", "-l", "r.img").rc == 0
    r = img("snapshot", "-c", "x", "r.img")
    assert r.rc == 1 and r.err.endswith("qemu-img: Could not create snapshot 'x': -95 (Operation not supported)\n")
    r = img("snapshot", "-a", "x", "r.img")
    assert r.rc == 1 and r.err.endswith("qemu-img: Could not apply snapshot 'x': Block driver does not support "
                                        "snapshots\n")
    r = img("snapshot", "-d", "x", "r.img")
    assert r.rc == 1 and r.err.endswith("qemu-img: Could not delete snapshot 'x': snapshot not found\n")


def test_option_errors() -> None:
    assert pimg("snapshot", "-l", "-a", "x", "a.pc") == Result(
        1, "", "qemu-img: Cannot mix '-l', '-a', '-c', '-d'\nTry 'qemu-img --help' for more information\n")
    assert pimg("snapshot", "-U", "-c", "x", "a.pc") == Result(
        1, "", "qemu-img: Could not open 'a.pc': force-share=on can only be used with read-only images\n")
    assert pimg("snapshot", "a.pc") == Result(0, "", "")


def test_capabilities_detect_the_new_hooks() -> None:
    from blockgraph.driver import Capabilities
    from blockgraph_raw.driver import RawDriver
    from helpers_pcow import PcowDriver

    pcow, raw = Capabilities.of(PcowDriver), Capabilities.of(RawDriver)
    assert (pcow.snapshot, pcow.check, pcow.change_backing_file, pcow.make_empty, pcow.amend, pcow.measure) == \
        (True,) * 6
    assert not pcow.vmstate
    assert (raw.snapshot, raw.check, raw.change_backing_file, raw.make_empty, raw.amend) == (False,) * 5
    assert raw.measure
    assert "has_snapshot=1" in pcow.lines() and "has_snapshot=0" in raw.lines()
