"""``blockgraph img measure``: raw's answer as qemu-img's, the driver hook, option errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers_img import Result, img, make_image
from helpers_pcow import pimg

QEMU_IMG = shutil.which("qemu-img")


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_image(Path("r.img"), 3 << 20, {4096: b"x" * 4096})


@pytest.mark.parametrize("args", [["--size", "1000"], ["--size", "1G"], ["-O", "raw", "r.img"],
                                  ["--output=json", "--size", "0"], ["-f", "raw", "--output=json", "r.img"],
                                  ["--size", "1M", "-o", "preallocation=full"]])
@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")
def test_raw_matches_qemu_img(args: list[str]) -> None:
    real = subprocess.run([QEMU_IMG, "measure", *args], capture_output=True, text=True)
    assert img("measure", *args) == Result(real.returncode, real.stdout, real.stderr)


def test_raw_values() -> None:
    assert img("measure", "--size", "1000") == Result(0, "required size: 1024\nfully allocated size: 1024\n", "")
    assert json.loads(img("measure", "--output=json", "-f", "raw", "r.img").out) == {
        "required": 3 << 20, "fully-allocated": 3 << 20}


def test_driver_hook_and_bitmaps_line() -> None:
    assert pimg("measure", "-O", "pcow", "--size", "1M") == Result(
        0, "required size: 4096\nfully allocated size: 1052672\n", "")
    assert pimg("measure", "-O", "pcow", "-o", "cluster_size=64k", "-f", "raw", "r.img").out == (
        "required size: 4096\nfully allocated size: 3149824\nbitmaps size: 0\n")


@pytest.mark.parametrize(("args", "err"), [
    ([], "qemu-img: Either --size N or one filename must be specified.\n"),
    (["--size", "1M", "r.img"], "qemu-img: --size N cannot be used together with a filename.\n"),
    (["-f", "raw", "--size", "1M"], "qemu-img: --image-opts, -f, and -l require a filename argument.\n"),
    (["a", "b"], "qemu-img: At most one filename argument is allowed.\n"),
    (["--output=xml", "--size", "1M"], "qemu-img: --output must be used with human or json as argument.\n"),
    (["-O", "nope", "--size", "1M"], "qemu-img: Unknown file format 'nope'\n"),
    (["-o", "foo=1", "--size", "1M"], "qemu-img: Invalid parameter 'foo'\n"
                                      "qemu-img: Invalid options for file format 'raw'\n"),
])
def test_errors(args: list[str], err: str) -> None:
    assert img("measure", *args) == Result(1, "", err)


@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")
def test_error_texts_match_qemu_img() -> None:
    for args in (["--size", "1M", "r.img"], ["-o", "foo=1", "--size", "1M"], ["-O", "nope", "--size", "1M"]):
        real = subprocess.run([QEMU_IMG, "measure", *args], capture_output=True, text=True)
        assert img("measure", *args) == Result(real.returncode, real.stdout, real.stderr)
