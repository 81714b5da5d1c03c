"""``blockgraph img map``: qemu-img's human and JSON maps of a raw file with holes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_img import data_extents, img, make_image, pattern

USAGE_TAIL = "Try 'qemu-img --help' for more information\n"
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def image() -> Path:
    path = make_image(Path("m.img"), 64 * MiB, {MiB: pattern(0xAB, 2 * MiB), 10 * MiB: pattern(1, 65536),
                                                63 * MiB: pattern(2, MiB)})
    assert data_extents(path) == [(MiB, 3 * MiB), (10 * MiB, 10 * MiB + 65536), (63 * MiB, 64 * MiB)]
    return path


JSON = [
    (0, MiB, False), (MiB, 2 * MiB, True), (3 * MiB, 7 * MiB, False), (10 * MiB, 65536, True),
    (10 * MiB + 65536, 53 * MiB - 65536, False), (63 * MiB, MiB, True),
]


def test_json_map(image: Path) -> None:
    r = img("map", "-f", "raw", "--output=json", "m.img")
    assert r.rc == 0 and r.err == ""
    expect = ",\n".join(f'{{ "start": {s}, "length": {n}, "depth": 0, "present": true, "zero": {str(not d).lower()},'
                        f' "data": {str(d).lower()}, "offset": {s}}}' for s, n, d in JSON)
    assert r.out == "[" + expect + "]\n"
    assert json.loads(r.out)[1] == {"start": MiB, "length": 2 * MiB, "depth": 0, "present": True, "zero": False,
                                    "data": True, "offset": MiB}


def test_human_map_lists_data_only(image: Path) -> None:
    r = img("map", "m.img")
    assert r.out == ("Offset          Length          Mapped to       File\n"
                     "0x100000        0x200000        0x100000        m.img\n"
                     "0xa00000        0x10000         0xa00000        m.img\n"
                     "0x3f00000       0x100000        0x3f00000       m.img\n")


def test_zero_offset_is_printed_as_plain_zero() -> None:
    make_image(Path("z.img"), MiB, {0: pattern(7, 4096)})
    assert img("map", "-f", "raw", "z.img").lines[1] == "0               0x1000          0               z.img"


def test_start_offset_and_max_length(image: Path) -> None:
    r = img("map", "-f", "raw", "--output=json", "--start-offset=1536k", "--max-length=10", "m.img")
    assert r.out == ('[{ "start": 1572864, "length": 10, "depth": 0, "present": true, "zero": false, '
                     '"data": true, "offset": 1572864}]\n')
    r = img("map", "-f", "raw", "--start-offset", "1536k", "--max-length", "1M", "m.img")
    assert r.lines[1] == "0x180000        0x100000        0x180000        m.img"


def test_start_beyond_the_end(image: Path) -> None:
    r = img("map", "--output=json", "--start-offset=100M", "m.img")
    assert r.out == '[{ "start": 104857600, "length": 0, "depth": 0, "present": false, "zero": false, "data": false}]\n'
    assert img("map", "--start-offset=100M", "m.img").out == "Offset          Length          Mapped to       File\n"


def test_raw_window_maps_to_host_offsets(image: Path) -> None:
    spec = 'json:{"driver":"raw","offset":1048576,"file":{"driver":"file","filename":"m.img"}}'
    r = img("map", spec)
    assert r.lines[1:] == ["0               0x200000        0x100000        m.img",
                           "0x900000        0x10000         0xa00000        m.img",
                           "0x3e00000       0x100000        0x3f00000       m.img"]


def test_null_co_has_no_host_offsets() -> None:
    r = img("map", "--output=json", "--image-opts", "driver=null-co,size=1M,read-zeroes=on")
    assert json.loads(r.out) == [{"start": 0, "length": MiB, "depth": 0, "present": True, "zero": True,
                                  "data": False, "offset": 0}]


@pytest.mark.parametrize(("args", "err"), [
    (["--start-offset=-1", "m.img"], "qemu-img: Invalid start offset specified. You may use k, M, G, T, P or E "
                                     "suffixes for\nqemu-img: kilobytes, megabytes, gigabytes, terabytes, "
                                     "petabytes and exabytes.\n"),
    (["--max-length=foo", "m.img"], "qemu-img: Invalid max length specified. You may use k, M, G, T, P or E "
                                    "suffixes for\nqemu-img: kilobytes, megabytes, gigabytes, terabytes, "
                                    "petabytes and exabytes.\n"),
    (["--output=yaml", "m.img"], "qemu-img: --output must be used with human or json as argument.\n"),
    (["nonexist.img"], "qemu-img: Could not open 'nonexist.img': Could not open 'nonexist.img': "
                       "No such file or directory\n"),
    ([], "qemu-img: Expecting one image file name\n" + USAGE_TAIL),
])
def test_errors(image: Path, args: list[str], err: str) -> None:
    r = img("map", *args)
    assert (r.rc, r.out, r.err) == (1, "", err)
