"""``blockgraph img compare``: qemu-img's messages and exit codes (0 same, 1 different, 2 open error)."""

from __future__ import annotations

import os
from pathlib import Path

import blockgraph
import pytest
from helpers_img import img, make_image, pattern

USAGE_TAIL = "Try 'qemu-img --help' for more information\n"
MiB = 1 << 20
IDENTICAL = "Images are identical.\n"


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def pair(size1: int = 4 * MiB, size2: int = 4 * MiB) -> None:
    make_image(Path("a.img"), size1, {MiB: pattern(0xAB, 65536)})
    make_image(Path("b.img"), size2, {MiB: pattern(0xAB, 65536)})


def test_identical() -> None:
    pair()
    assert img("compare", "a.img", "b.img") == _r(0, IDENTICAL)
    assert img("compare", "-s", "-f", "raw", "-F", "raw", "a.img", "b.img") == _r(0, IDENTICAL)


def test_mismatch_is_reported_at_the_sector() -> None:
    pair()
    with open("b.img", "r+b") as f:
        f.seek(MiB + 1000)
        f.write(b"x")
    assert img("compare", "a.img", "b.img") == _r(1, f"Content mismatch at offset {MiB + 512}!\n")
    assert img("compare", "-q", "a.img", "b.img") == _r(1, "")


def test_data_against_a_hole() -> None:
    pair()
    with open("b.img", "r+b") as f:
        f.seek(3 * MiB + 4096)
        f.write(b"\x01")
    assert img("compare", "a.img", "b.img") == _r(1, f"Content mismatch at offset {3 * MiB + 4096}!\n")
    assert img("compare", "b.img", "a.img") == _r(1, f"Content mismatch at offset {3 * MiB + 4096}!\n")


def test_written_zeros_equal_a_hole_unless_strict() -> None:
    pair()
    with open("b.img", "r+b") as f:
        f.seek(2 * MiB)
        f.write(bytes(65536))
    assert img("compare", "a.img", "b.img") == _r(0, IDENTICAL)
    # qemu-img reports the first extent whose status differs: a's hole after the data reaches the end of
    # the image (EOF set), b's stops at the zeros (verified against qemu-img 7.2).
    expect = f"Strict mode: Offset {MiB + 65536} block status mismatch!\n"
    assert img("compare", "-s", "a.img", "b.img") == _r(1, expect)


def test_size_difference() -> None:
    pair(4 * MiB, 8 * MiB)
    assert img("compare", "a.img", "b.img") == _r(0, "Warning: Image size mismatch!\n" + IDENTICAL)
    assert img("compare", "b.img", "a.img") == _r(0, "Warning: Image size mismatch!\n" + IDENTICAL)
    assert img("compare", "-s", "a.img", "b.img") == _r(1, "Strict mode: Image size mismatch!\n")
    with open("b.img", "r+b") as f:
        f.seek(6 * MiB)
        f.write(b"\x01")
    expect = "Warning: Image size mismatch!\nContent mismatch at offset 6291456!\n"
    assert img("compare", "a.img", "b.img") == _r(1, expect)
    assert img("compare", "b.img", "a.img") == _r(1, expect)


def test_mismatch_in_large_random_data() -> None:
    data = os.urandom(20 * MiB)
    make_image(Path("a.img"), 20 * MiB, {0: data})
    make_image(Path("b.img"), 20 * MiB, {0: data, 12345678: b"X" if data[12345678] != ord("X") else b"Y"})
    assert img("compare", "a.img", "b.img") == _r(1, "Content mismatch at offset 12345344!\n")


def test_progress_output() -> None:
    pair()
    r = img("compare", "-p", "a.img", "b.img")
    assert r == _r(0, "    (0.00/100%)\r    (25.00/100%)\r    (100.00/100%)\r" + IDENTICAL + "\n")
    assert img("compare", "-p", "-q", "a.img", "b.img") == _r(0, "")


def test_open_errors_exit_2() -> None:
    pair()
    err = "qemu-img: Could not open 'nonexist.img': Could not open 'nonexist.img': No such file or directory\n"
    assert img("compare", "a.img", "nonexist.img") == _r(2, "", err)
    assert img("compare", "nonexist.img", "a.img") == _r(2, "", err)
    assert img("compare", "-T", "bogus", "a.img", "b.img") == _r(2, "", "qemu-img: Invalid source cache "
                                                                        "option: bogus\n")
    r = img("compare", "-f", "nosuch", "a.img", "b.img")
    assert (r.rc, r.err) == (2, "qemu-img: Could not open 'a.img': Unknown driver 'nosuch'\n")


def test_usage_errors_exit_1() -> None:
    assert img("compare", "a.img") == _r(1, "", "qemu-img: Expecting two image file names\n" + USAGE_TAIL)
    assert img("compare", "-Ux", "a", "b") == _r(1, "", "qemu-img: unrecognized option '-Ux'\n" + USAGE_TAIL)


def test_compare_shares_the_images() -> None:
    # compare takes only consistent read and shares everything, like qemu-img.
    pair()
    with blockgraph.open("a.img", "raw"):
        assert img("compare", "a.img", "b.img") == _r(0, IDENTICAL)
        assert img("compare", "-U", "a.img", "b.img") == _r(0, IDENTICAL)


def _r(rc: int, out: str, err: str = "") -> object:
    from helpers_img import Result

    return Result(rc, out, err)
