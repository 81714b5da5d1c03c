"""``blockgraph img commit``: data down the chain into the base, the top emptied unless -d / -b, errors."""

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


def mapped(name: str) -> list[str]:
    return pimg("map", "-f", "pcow", name).lines[1:]


def test_commit_into_immediate_backing_and_empty_top(tmp_path: Path) -> None:
    base, mid, top = pcow_chain(tmp_path, {0: b"\x01" * 16 * K}, {4 * K: b"\x02" * 4 * K}, {8 * K: b"\x03" * 4 * K})
    assert pimg("commit", top) == Result(0, "Image committed.\n", "")
    assert reads(mid, (1, 0, 4 * K), (2, 4 * K, 4 * K), (3, 8 * K, 4 * K), (1, 12 * K, 4 * K))
    assert reads(base, (1, 0, 16 * K))
    assert mapped(top) and not any(line.endswith("l2.pc") for line in mapped(top))  # emptied
    assert reads(top, (1, 0, 4 * K), (2, 4 * K, 4 * K), (3, 8 * K, 4 * K))


def test_d_keeps_the_top(tmp_path: Path) -> None:
    base, top = pcow_chain(tmp_path, {}, {0: b"\x05" * 4 * K})
    assert pimg("commit", "-d", "-q", top) == Result(0, "", "")
    assert reads(base, (5, 0, 4 * K))
    assert any(line.endswith("l1.pc") for line in mapped(top))


def test_b_names_a_deeper_base_and_implies_d(tmp_path: Path) -> None:
    base, _mid, top = pcow_chain(tmp_path, {}, {0: b"\x02" * 4 * K}, {4 * K: b"\x03" * 4 * K})
    assert pimg("commit", "-b", "l0.pc", top) == Result(0, "Image committed.\n", "")
    assert reads(base, (2, 0, 4 * K), (3, 4 * K, 4 * K))
    assert any(line.endswith("l2.pc") for line in mapped(top))


def test_base_grows_to_the_top_size(tmp_path: Path) -> None:
    base, = pcow_chain(tmp_path, {})
    assert pimg("create", "-q", "-f", "pcow", "-b", "l0.pc", "-F", "pcow", "big.pc", "2M").rc == 0
    assert pio("-f", "pcow", "-c", "write -P 7 1536k 4k", "big.pc").rc == 0
    assert pimg("commit", "big.pc").rc == 0
    assert "virtual size: 2 MiB" in pimg("info", base).out
    assert reads(base, (7, 1536 * K, 4 * K))


def test_errors(tmp_path: Path) -> None:
    make_image(Path("r.img"), 1 << 20)
    assert img("commit", "-f", "raw", "r.img") == Result(1, "", "qemu-img: Image does not have a backing file\n")
    _, top = pcow_chain(tmp_path, {}, {})
    assert pimg("commit", "-b", "nope", top) == Result(
        1, "", f"qemu-img: Did not find 'nope' in the backing chain of '{top}'\n")
    assert pimg("commit", "-t", "bogus", top) == Result(1, "", "qemu-img: Invalid cache option: bogus\n")
    assert pimg("commit").err == "qemu-img: Expecting one image file name\nTry 'qemu-img --help' for more " \
                                 "information\n"
