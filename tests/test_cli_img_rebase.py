"""``blockgraph img rebase``: safe mode keeps what the image shows, -u only rewrites the header, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_img import Result, img, make_image
from helpers_pcow import pcow_chain, pimg, pio

K = 1024


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def reads(name: str, *checks: tuple[int, int, int]) -> bool:
    cmds = [a for pat, off, n in checks for a in ("-c", f"read -P {pat} {off} {n}")]
    r = pio("-f", "pcow", *cmds, name)
    return r.rc == 0 and "verification failed" not in r.out


def backing_line(name: str) -> str:
    return next((line for line in pimg("info", name).lines if line.startswith("backing file:")), "")


def test_safe_rebase_onto_another_image(tmp_path: Path) -> None:
    _, top = pcow_chain(tmp_path, {0: b"\x01" * 8 * K}, {4 * K: b"\x02" * 4 * K})
    assert pimg("create", "-q", "-f", "pcow", "other.pc", "1M").rc == 0
    assert pio("-f", "pcow", "-c", "write -P 9 0 2k", "-c", "write -P 1 64k 4k", "other.pc").rc == 0
    assert pimg("rebase", "-b", "other.pc", "-F", "pcow", top) == Result(0, "", "")
    assert backing_line(top).startswith("backing file: other.pc")
    assert reads(top, (1, 0, 4 * K), (2, 4 * K, 4 * K), (0, 8 * K, 56 * K), (0, 64 * K, 4 * K))
    # only what differed was copied in: cluster 0 (old 1s vs new 9s/0s) and 64k (old zeros vs new 1s)
    lines = [line.split()[:2] for line in pimg("map", "-f", "pcow", top).lines[1:]]
    assert lines == [["0", "0x2000"], ["0x10000", "0x1000"]]  # cluster 1 was the image's own


def test_rebase_down_the_chain_compares_only_the_layers_between(tmp_path: Path) -> None:
    _base, _mid, top = pcow_chain(tmp_path, {0: b"\x01" * 16 * K}, {4 * K: b"\x02" * 4 * K}, {})
    assert pimg("rebase", "-b", "l0.pc", "-F", "pcow", top).rc == 0
    assert reads(top, (1, 0, 4 * K), (2, 4 * K, 4 * K), (1, 8 * K, 8 * K))
    assert backing_line(top).startswith("backing file: l0.pc")


def test_standalone_with_empty_name(tmp_path: Path) -> None:
    _, top = pcow_chain(tmp_path, {0: b"\x03" * 4 * K}, {})
    assert pimg("rebase", "-b", "", top).rc == 0
    assert backing_line(top) == ""
    assert reads(top, (3, 0, 4 * K))


def test_unsafe_only_rewrites_the_header(tmp_path: Path) -> None:
    _, top = pcow_chain(tmp_path, {0: b"\x03" * 4 * K}, {})
    Path("l0.pc").rename("moved.pc")
    assert pimg("rebase", "-u", "-b", "moved.pc", "-F", "pcow", top) == Result(0, "", "")
    assert reads(top, (3, 0, 4 * K))


def test_errors(tmp_path: Path) -> None:
    _, top = pcow_chain(tmp_path, {}, {})
    assert pimg("rebase", top) == Result(1, "", "qemu-img: Must specify backing file (-b) or use unsafe mode "
                                                "(-u)\nTry 'qemu-img --help' for more information\n")
    assert pimg("rebase", "-b", "l0.pc", top) == Result(
        1, "", "qemu-img: Could not change the backing file to 'l0.pc': backing format must be specified\n")
    assert pimg("rebase", "-b", "l0.pc", "-F", "foo", top) == Result(1, "", "qemu-img: Invalid format name: 'foo'\n")
    r = pimg("rebase", "-b", "nonex.pc", "-F", "pcow", top)
    assert r.rc == 1 and r.err.startswith("qemu-img: Could not open new backing file 'nonex.pc': Could not open ")
    make_image(Path("r.img"), 1 << 20)
    assert img("rebase", "-f", "raw", "-u", "-b", "x", "-F", "raw", "r.img") == Result(
        1, "", "qemu-img: Could not change the backing file to 'x': Operation not supported\n")
