"""``blockgraph img convert``: contents, holes, zero detection, -n, -S, -m/-W, -C, -p, errors, locking."""

from __future__ import annotations

import os
from pathlib import Path

import blockgraph
import pytest
from blockgraph.cli.img_copy import zero_blocks
from helpers_img import Result, data_extents, img, make_image, pattern

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def src() -> Path:
    """Random data, written zeros inside data, holes: 16 MiB."""
    extents = {0: os.urandom(MiB), 3 * MiB: os.urandom(2 * MiB) + bytes(64 * 1024) + os.urandom(4096),
               15 * MiB: os.urandom(MiB - 4096)}
    return make_image(Path("src.img"), 16 * MiB, extents)


def read(path: str) -> bytes:
    return Path(path).read_bytes()


def test_convert_copies_data_and_keeps_holes(src: Path) -> None:
    assert img("convert", "-f", "raw", "-O", "raw", "src.img", "out.img") == Result(0, "", "")
    assert read("out.img") == read("src.img")
    # zeros that were written inside data become a hole too, as qemu-img's 4k zero detection does
    z = 5 * MiB
    assert data_extents(Path("out.img")) == [(0, MiB), (3 * MiB, z), (z + 65536, z + 65536 + 4096),
                                             (15 * MiB, 16 * MiB - 4096)]


@pytest.mark.parametrize("opts", [["-m", "1"], ["-m", "16"], ["-W"], ["-W", "-m", "3"], ["-C"], ["-t", "writeback"],
                                  ["-T", "none"], ["-t", "none"], ["-r", "1G"]])
def test_options_give_the_same_result(src: Path, opts: list[str]) -> None:
    assert img("convert", *opts, "src.img", "out.img").rc == 0
    assert read("out.img") == read("src.img")
    assert img("compare", "src.img", "out.img").rc == 0


def test_sparse_size_zero_fully_allocates(src: Path) -> None:
    assert img("convert", "-S", "0", "src.img", "out.img").rc == 0
    assert read("out.img") == read("src.img")
    assert data_extents(Path("out.img")) == [(0, 16 * MiB)]


def test_bigger_sparse_size_keeps_small_zero_runs(src: Path) -> None:
    assert img("convert", "-S", "128k", "src.img", "out.img").rc == 0
    assert read("out.img") == read("src.img")
    assert (3 * MiB, 5 * MiB + 65536 + 4096) in data_extents(Path("out.img"))


def test_existing_target_gets_zeros_written(src: Path) -> None:
    make_image(Path("dst.img"), 20 * MiB, {0: pattern(0xEE, 20 * MiB)})
    assert img("convert", "-n", "-O", "raw", "src.img", "dst.img").rc == 0
    out = read("dst.img")
    assert out[:16 * MiB] == read("src.img") and out[16 * MiB:] == pattern(0xEE, 4 * MiB)
    assert (MiB, 3 * MiB) not in data_extents(Path("dst.img"))  # zeros went through write-zeroes (unmap)


def test_target_is_zero_skips_zero_writes(src: Path) -> None:
    make_image(Path("dst.img"), 16 * MiB)
    assert img("convert", "-n", "--target-is-zero", "src.img", "dst.img").rc == 0
    assert read("dst.img") == read("src.img")


def test_several_sources_are_concatenated(src: Path) -> None:
    make_image(Path("two.img"), 1000, {0: pattern(9, 1000)})
    assert img("convert", "src.img", "two.img", "src.img", "out.img").rc == 0
    out = read("out.img")
    assert len(out) == 32 * MiB + 1024  # every source takes whole sectors, as in qemu-img
    assert out[:16 * MiB] == read("src.img") and out[16 * MiB:16 * MiB + 1000] == pattern(9, 1000)
    assert out[16 * MiB + 1000:16 * MiB + 1024] == bytes(24) and out[16 * MiB + 1024:] == read("src.img")


def test_progress_output(src: Path) -> None:
    r = img("convert", "-p", "src.img", "out.img")
    assert r.rc == 0 and r.out.startswith("    (0.00/100%)\r") and r.out.endswith("    (100.00/100%)\r\n")
    steps = [float(p.strip(" (").split("/")[0]) for p in r.out.strip("\r\n").split("\r")]
    assert steps == sorted(steps) and len(steps) > 3
    assert img("convert", "-p", "-q", "src.img", "out.img") == Result(0, "", "")


def test_create_options_and_help(src: Path) -> None:
    assert img("convert", "-o", "preallocation=falloc", "src.img", "out.img").rc == 0
    assert read("out.img") == read("src.img")
    Path("out.img").unlink()
    r = img("convert", "-O", "raw", "-o", "help", "src.img", "out.img")
    assert r.rc == 0 and r.lines[0] == "Supported options:" and not Path("out.img").exists()
    assert img("convert", "-O", "raw", "-o", "help").lines[0] == "Supported raw options:"


@pytest.mark.parametrize(("args", "err"), [
    (["-S", "1000"], "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to "
                     "16777216. Select 0 to disable sparse detection (fully allocates output)."),
    (["-S", "32M"], "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to "
                    "16777216. Select 0 to disable sparse detection (fully allocates output)."),
    (["-m", "0"], "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"),
    (["-m", "17"], "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"),
    (["-T", "bogus"], "Invalid source cache option: bogus"),
    (["-O", "nosuch"], "Unknown file format 'nosuch'"),
    (["-o", "bogus=1"], "Invalid parameter 'bogus'"),
    (["-C", "-S", "4k"], "Cannot enable copy offloading when -S is used"),
    (["-c"], "Compression not supported for this file format"),
    (["-B", "base.img"], "Backing file not supported for file format 'raw'"),
    (["--target-is-zero"], "--target-is-zero requires use of -n flag"),
    (["-n", "-o", "preallocation=full"], "-o has no effect when skipping image creation"),
    (["--skip-broken-bitmaps"], "Use of --skip-broken-bitmaps requires --bitmaps"),
])
def test_option_errors(src: Path, args: list[str], err: str) -> None:
    assert img("convert", *args, "src.img", "out.img") == Result(1, "", f"qemu-img: {err}\n")
    assert not Path("out.img").exists()


def test_file_errors(src: Path) -> None:
    assert img("convert", "src.img") == Result(1, "", "qemu-img: Must specify image file name\n")
    assert img("convert", "nonexist.img", "out.img") == Result(
        1, "", "qemu-img: Could not open 'nonexist.img': Could not open 'nonexist.img': No such file or directory\n")
    assert img("convert", "src.img", "/nonexistent-dir/o.img") == Result(
        1, "", "qemu-img: /nonexistent-dir/o.img: error while converting raw: Could not create "
               "'/nonexistent-dir/o.img': No such file or directory\n")
    make_image(Path("small.img"), MiB)
    assert img("convert", "-n", "src.img", "small.img") == Result(
        1, "", "qemu-img: output file is smaller than input file\n")


def test_source_in_use_by_a_writer_is_refused_unless_U(src: Path) -> None:
    with blockgraph.open("src.img", "raw"):
        r = img("convert", "src.img", "out.img")
        assert r.rc == 1
        assert r.err.startswith("qemu-img: Could not open 'src.img': ") and "write" in r.err
        assert r.err.splitlines()[-1] == "Is another process using the image [src.img]?"  # as qemu-img: no -U hint
        assert img("convert", "-U", "src.img", "out.img").rc == 0
    assert read("out.img") == read("src.img")


def test_zero_blocks_finds_aligned_zero_runs() -> None:
    g = 4096
    buf = bytearray(os.urandom(16 * g))
    buf[g:3 * g] = bytes(2 * g)  # two aligned zero blocks
    buf[5 * g + 10:7 * g - 10] = bytes(2 * g - 20)  # zero run covering no whole aligned block
    buf[15 * g:] = bytes(g)
    assert zero_blocks(buf, len(buf), g, bytes(g), bytes(len(buf))) == [(g, 3 * g), (15 * g, 16 * g)]
    assert zero_blocks(buf, 15 * g + 100, g, bytes(g)) == [(g, 3 * g), (15 * g, 15 * g + 100)]
    assert zero_blocks(bytearray(8 * g), 8 * g, g, bytes(g), bytes(8 * g)) == [(0, 8 * g)]


def test_converting_onto_the_source_is_refused_before_anything_is_truncated(src: Path) -> None:
    before = read("src.img")
    r = img("convert", "src.img", "src.img")
    assert r == Result(1, "", "qemu-img: src.img: error while converting raw: Failed to get \"write\" lock\n"
                              "Is another process using the image [src.img]?\n")
    assert read("src.img") == before
