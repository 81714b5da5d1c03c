"""``blockgraph img check``: qemu-img's summary lines, JSON, exit codes and -r repairs (on raw and pcow)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers_img import Result, img, make_image
from helpers_pcow import BITMAP_AT, CORRUPT_AT, pimg, pio

MiB = 1 << 20
QEMU_IMG = shutil.which("qemu-img")


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def _pcow(leaks: int = 0, corrupt: bool = False) -> str:
    assert pimg("create", "-q", "-f", "pcow", "a.pc", "1M").rc == 0
    fd = os.open("a.pc", os.O_RDWR)
    try:
        if leaks:  # bitmap bits past the disk's 256 clusters
            os.pwrite(fd, bytes([(1 << leaks) - 1]), BITMAP_AT + 40)
        if corrupt:
            os.pwrite(fd, b"\x01", CORRUPT_AT)
    finally:
        os.close(fd)
    return "a.pc"


def test_raw_has_no_check() -> None:
    make_image(Path("r.img"), MiB)
    assert img("check", "-f", "raw", "r.img") == Result(63, "", "qemu-img: This image format does not support checks\n")


@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")
def test_raw_matches_qemu_img() -> None:
    import subprocess

    make_image(Path("r.img"), MiB)
    real = subprocess.run([QEMU_IMG, "check", "-f", "raw", "r.img"], capture_output=True, text=True)
    assert img("check", "-f", "raw", "r.img") == Result(real.returncode, real.stdout, real.stderr)


def test_clean_image() -> None:
    r = pimg("check", _pcow())
    assert r == Result(0, "No errors were found on the image.\nImage end offset: 1052672\n", "")


def test_leaks_exit_3_and_repair() -> None:
    name = _pcow(leaks=2)
    r = pimg("check", name)
    assert r.rc == 3
    assert r.err == "Leaked cluster 320 refcount=1 reference=0\nLeaked cluster 321 refcount=1 reference=0\n"
    assert r.out == ("\n2 leaked clusters were found on the image.\n"
                     "This means waste of disk space, but no harm to data.\nImage end offset: 1052672\n")
    r = pimg("check", "-r", "leaks", name)
    assert r.rc == 0
    assert r.out == ("The following inconsistencies were found and repaired:\n\n    2 leaked clusters\n"
                     "    0 corruptions\n\nDouble checking the fixed image now...\n"
                     "No errors were found on the image.\nImage end offset: 1052672\n")
    assert pimg("check", name).rc == 0


def test_corruption_exit_2_needs_r_all() -> None:
    name = _pcow(corrupt=True)
    r = pimg("check", name)
    assert r.rc == 2 and r.err == "ERROR cluster 0 refcount=0 reference=1\n"
    assert "\n1 errors were found on the image.\nData may be corrupted, or further writes to the image may " \
           "corrupt it.\n" in r.out
    assert pimg("check", "-r", "leaks", name).rc == 2
    r = pimg("check", "-r", "all", name)
    assert r.rc == 0 and "    0 leaked clusters\n    1 corruptions\n" in r.out
    assert pimg("check", name).rc == 0


def test_json_and_quiet() -> None:
    name = _pcow(leaks=1)
    r = pimg("check", "--output=json", name)
    assert r.rc == 3
    assert json.loads(r.out) == {"image-end-offset": 1052672, "total-clusters": 256, "check-errors": 0,
                                 "leaks": 1, "filename": "a.pc", "format": "pcow"}
    r = pimg("check", "-r", "leaks", "--output=json", name)
    assert r.rc == 0 and json.loads(r.out)["leaks-fixed"] == 1 and "Double" not in r.out
    assert pimg("check", "-q", name) == Result(0, "", "")


def test_allocation_line() -> None:
    name = _pcow()
    assert pio("-f", "pcow", "-c", "write 0 8k", name).rc == 0
    assert "2/256 = 0.78% allocated, 0.00% fragmented, 0.00% compressed clusters\n" in pimg("check", name).out


@pytest.mark.parametrize(("args", "err"), [
    (["-r", "some"], "qemu-img: Unknown option value for -r (expecting 'leaks' or 'all'): some\n"
                     "Try 'qemu-img --help' for more information\n"),
    (["--output=xml"], "qemu-img: --output must be used with human or json as argument.\n"),
    (["-T", "bogus"], "qemu-img: Invalid source cache option: bogus\n"),
])
def test_option_errors(args: list[str], err: str) -> None:
    make_image(Path("r.img"), MiB)
    assert img("check", *args, "-f", "raw", "r.img") == Result(1, "", err)


def test_needs_one_file() -> None:
    assert img("check").err == "qemu-img: Expecting one image file name\nTry 'qemu-img --help' for more information\n"
