"""``blockgraph img dd``: bs/count/skip as qemu-img dd has them, its errors, and -p."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers_img import Result, img, make_image

MiB = 1 << 20
SUFFIX = "qemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n"


@pytest.fixture(autouse=True)
def _image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    monkeypatch.chdir(tmp_path)
    data = os.urandom(4 * MiB)
    make_image(Path("in.img"), 8 * MiB, {MiB: data})
    return data


def src() -> bytes:
    return Path("in.img").read_bytes()


def test_whole_image_default_block_size() -> None:
    assert img("dd", "if=in.img", "of=out.img") == Result(0, "", "")
    assert Path("out.img").read_bytes() == src()


def test_count_and_skip() -> None:
    assert img("dd", "-f", "raw", "-O", "raw", "if=in.img", "of=out.img", "bs=1M", "count=2").rc == 0
    assert Path("out.img").read_bytes() == src()[:2 * MiB]
    # qemu-img dd counts from the start of the input, before skipping.
    assert img("dd", "if=in.img", "of=out.img", "bs=1M", "count=3", "skip=1").rc == 0
    assert Path("out.img").read_bytes() == src()[MiB:3 * MiB]
    assert img("dd", "if=in.img", "of=out.img", "bs=64k", "skip=3").rc == 0
    assert Path("out.img").read_bytes() == src()[3 * 65536:]


def test_odd_block_size_copies_a_partial_last_block() -> None:
    assert img("dd", "if=in.img", "of=out.img", "bs=3000", "count=5").rc == 0
    assert Path("out.img").read_bytes()[:15000] == src()[:15000]


def test_skip_beyond_the_end_makes_an_empty_image() -> None:
    r = img("dd", "if=in.img", "of=out.img", "bs=1M", "skip=100")
    assert r == Result(0, "", "qemu-img: in.img: cannot skip to specified offset\n")
    assert os.path.getsize("out.img") == 0


def test_progress() -> None:
    r = img("dd", "-p", "if=in.img", "of=out.img", "bs=1M")
    assert r.rc == 0 and r.out.startswith("    (0.00/100%)\r") and r.out.endswith("    (100.00/100%)\r\n")
    assert Path("out.img").read_bytes() == src()


@pytest.mark.parametrize(("args", "err"), [
    (["bs=0"], "qemu-img: Invalid bs specified. Must be between 1 and 2147483647.\n"),
    (["bs=foo"], "qemu-img: Invalid bs specified. You may use k, M, G, T, P or E suffixes for\n" + SUFFIX),
    (["count=-1"], "qemu-img: Invalid count specified. You may use k, M, G, T, P or E suffixes for\n" + SUFFIX),
    (["skip=x"], "qemu-img: Invalid skip specified. You may use k, M, G, T, P or E suffixes for\n" + SUFFIX),
    (["foo=bar"], "qemu-img: unrecognized operand foo\n"),
    (["foo"], "qemu-img: unrecognized operand foo\n"),
    (["-O", "nosuch"], "qemu-img: Unknown file format\n"),
])
def test_errors(args: list[str], err: str) -> None:
    assert img("dd", "if=in.img", "of=out.img", *args) == Result(1, "", err)
    assert not Path("out.img").exists()


def test_missing_files() -> None:
    assert img("dd", "if=in.img") == Result(1, "", "qemu-img: Must specify both input and output files\n")
    assert img("dd", "if=nonexist", "of=out.img") == Result(
        1, "", "qemu-img: Could not open 'nonexist': Could not open 'nonexist': No such file or directory\n")
    assert img("dd", "if=in.img", "of=/nonexistent-dir/o.img") == Result(
        1, "", "qemu-img: /nonexistent-dir/o.img: error while creating output image: Could not create "
               "'/nonexistent-dir/o.img': No such file or directory\n")


def test_output_onto_the_input_is_refused() -> None:
    before = src()
    r = img("dd", "if=in.img", "of=in.img")
    assert r.rc == 1 and r.err.startswith("qemu-img: in.img: error while creating output image: Failed to get")
    assert src() == before
