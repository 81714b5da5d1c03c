"""``blockgraph img resize``: absolute and relative sizes, --shrink, --preallocation, qemu-img's errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers_img import Result, allocated, img, make_image, pattern

USAGE_TAIL = "Try 'qemu-img --help' for more information\n"
MiB = 1 << 20
SHRINK = ("qemu-img: Use the --shrink option to perform a shrink operation.\n"
          "qemu-img: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before "
          "performing such an operation, make sure there is no important data there.\n")


@pytest.fixture(autouse=True)
def _image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_image(Path("r.img"), MiB, {0: pattern(5, 4096)})


def size() -> int:
    return os.path.getsize("r.img")


@pytest.mark.parametrize(("arg", "expect"), [("2M", 2 * MiB), ("+1M", 2 * MiB), ("+0", MiB), ("0x200000", 2 * MiB)])
def test_grow(arg: str, expect: int) -> None:
    assert img("resize", "-f", "raw", "r.img", arg) == Result(0, "Image resized.\n", "")
    assert size() == expect
    assert Path("r.img").read_bytes()[:4096] == pattern(5, 4096)


def test_probed_format_warns() -> None:
    r = img("resize", "r.img", "2M")
    assert r.rc == 0 and r.out == "Image resized.\n"
    assert r.err.startswith("WARNING: Image format was not specified for 'r.img' and probing guessed raw.")


@pytest.mark.parametrize("arg", ["-1k", "1000"])
def test_shrink_needs_the_flag(arg: str) -> None:
    assert img("resize", "-f", "raw", "r.img", arg) == Result(1, "", SHRINK)
    assert size() == MiB
    assert img("resize", "-f", "raw", "--shrink", "r.img", arg) == Result(0, "Image resized.\n", "")
    assert size() == (MiB - 1024 if arg == "-1k" else 1000)


def test_quiet() -> None:
    assert img("resize", "-q", "-f", "raw", "r.img", "3M") == Result(0, "", "")
    assert size() == 3 * MiB


def test_preallocation() -> None:
    before = allocated(Path("r.img"))
    assert img("resize", "-f", "raw", "--preallocation=falloc", "r.img", "4M").rc == 0
    assert size() == 4 * MiB and allocated(Path("r.img")) >= before + 3 * MiB
    assert img("resize", "-f", "raw", "--preallocation=full", "r.img", "5M").rc == 0
    assert size() == 5 * MiB
    err = "qemu-img: Preallocation can only be used for growing images\n"
    assert img("resize", "-f", "raw", "--preallocation=falloc", "r.img", "5M") == Result(1, "", err)
    assert img("resize", "-f", "raw", "--preallocation=bogus", "r.img", "6M") == \
        Result(1, "", "qemu-img: Invalid preallocation mode 'bogus'\n")


@pytest.mark.parametrize(("args", "err"), [
    (["-f", "raw", "r.img", "0"], "qemu-img: New image size must be positive\n"),
    (["-f", "raw", "r.img", "-10M"], "qemu-img: New image size must be positive\n"),
    (["-f", "raw", "r.img", "8E"], "qemu-img: New image size must be positive\n"),
    (["-f", "raw", "r.img", "foo"], "qemu-img: Parameter 'size' expects a non-negative number below 2^64\n"
                                    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                                    "and exabytes, respectively.\n"),
    (["-f", "raw", "r.img"], "qemu-img: Expecting image file name and size\n" + USAGE_TAIL),
    (["r.img"], "qemu-img: Not enough arguments\n" + USAGE_TAIL),
    (["-U", "-f", "raw", "r.img", "2M"], "qemu-img: unrecognized option '-U'\n" + USAGE_TAIL),
    (["-f", "raw", "nonexist.img", "1M"], "qemu-img: Could not open 'nonexist.img': Could not open "
                                          "'nonexist.img': No such file or directory\n"),
    (["-f", "raw", 'json:{"driver":"raw","size":1024,"file":{"driver":"file","filename":"r.img"}}', "6M"],
     "qemu-img: Cannot resize fixed-size raw disks\n"),
])
def test_errors(args: list[str], err: str) -> None:
    assert img("resize", *args) == Result(1, "", err)
    assert size() == MiB


def test_image_opts() -> None:
    assert img("resize", "--image-opts", "driver=raw,file.filename=r.img", "6M").rc == 0
    assert size() == 6 * MiB


@pytest.mark.parametrize("fmt", ["vpc", "vdi"])
def test_driver_without_resize(fmt: str) -> None:
    """QEMU 7.2 names no driver here (bdrv_co_truncate), for vpc and vdi alike."""
    assert img("create", "-q", "-f", fmt, f"t.{fmt}", "8M").rc == 0
    assert img("resize", "-f", fmt, f"t.{fmt}", "16M") == Result(
        1, "", "qemu-img: Image format driver does not support resize\n")
