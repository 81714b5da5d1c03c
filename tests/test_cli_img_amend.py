"""``blockgraph img amend``: the driver's amend hook, creation-only options refused with qemu-img's hint."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_img import Result, img, make_image
from helpers_pcow import pimg


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_image(Path("r.img"), 1 << 20)
    assert pimg("create", "-q", "-f", "pcow", "a.pc", "1M").rc == 0


def test_amend_size() -> None:
    assert pimg("amend", "-o", "size=2M", "a.pc") == Result(0, "", "")
    assert "virtual size: 2 MiB (2097152 bytes)" in pimg("info", "a.pc").out
    assert pimg("amend", "-o", "size=1M", "a.pc") == Result(1, "", "qemu-img: Cannot shrink without --force\n")
    assert pimg("amend", "--force", "-o", "size=1M", "a.pc").rc == 0


def test_refusals() -> None:
    assert pimg("amend", "-o", "cluster_size=64k", "a.pc") == Result(
        1, "", "qemu-img: Invalid parameter 'cluster_size'\nThis option is only supported for image "
               "creation\n")
    assert pimg("amend", "-o", "foo=1", "a.pc") == Result(1, "", "qemu-img: Invalid parameter 'foo'\n")
    assert img("amend", "-f", "raw", "-o", "size=2M", "r.img") == Result(
        1, "", "qemu-img: Format driver 'raw' does not support option amendment\n")
    assert pimg("amend", "a.pc") == Result(
        1, "", "qemu-img: Must specify options (-o)\nTry 'qemu-img --help' for more information\n")


def test_help() -> None:
    assert pimg("amend", "-f", "pcow", "-o", "help") == Result(
        0, "Amend options for 'pcow':\n  size=<size>            - Virtual disk size\n", "")
