"""``blockgraph img info``: qemu-img's human and JSON ImageInfo, backing chains, names, errors."""

from __future__ import annotations

import json
from pathlib import Path

import blockgraph
import pytest
from blockgraph.cli.img_util import size_to_str
from helpers_img import allocated, img, make_image, pattern

USAGE_TAIL = "Try 'qemu-img --help' for more information\n"


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def image() -> Path:
    return make_image(Path("s.img"), 64 << 20, {1 << 20: pattern(0xAB, 2 << 20), 10 << 20: pattern(1, 65536)})


def test_human_output(image: Path) -> None:
    r = img("info", "s.img")
    assert r.rc == 0 and r.err == ""
    assert r.out == ("image: s.img\nfile format: raw\nvirtual size: 64 MiB (67108864 bytes)\n"
                     f"disk size: {size_to_str(allocated(image))}\n")


def test_json_output_has_qemus_fields_in_qemus_order(image: Path) -> None:
    r = img("info", "--output=json", "-f", "raw", "s.img")
    assert r.rc == 0
    assert r.out == ('{\n    "virtual-size": 67108864,\n    "filename": "s.img",\n    "format": "raw",\n'
                     f'    "actual-size": {allocated(image)},\n    "dirty-flag": false\n}}\n')


def test_backing_chain_json_is_a_list(image: Path) -> None:
    r = img("info", "--output", "json", "--backing-chain", "s.img")
    data = json.loads(r.out)
    assert isinstance(data, list) and len(data) == 1 and data[0]["virtual-size"] == 64 << 20
    assert r.out.startswith("[\n    {\n        \"virtual-size\"")
    human = img("info", "--backing-chain", "s.img")
    assert human.out == img("info", "s.img").out


def test_protocol_as_format(image: Path) -> None:
    r = img("info", "--output=json", "-f", "file", "s.img")
    assert json.loads(r.out)["format"] == "file"
    assert img("info", "-f", "file", "s.img").lines[1] == "file format: file"


def test_image_opts_and_json_filenames(image: Path) -> None:
    assert img("info", "--image-opts", "driver=raw,file.filename=s.img").lines[0] == "image: s.img"
    assert img("info", "--image-opts", "file.filename=s.img").lines[:2] == ["image: s.img", "file format: raw"]
    plain = 'json:{"driver":"raw","file":{"driver":"file","filename":"s.img"}}'
    assert img("info", plain).lines[0] == "image: s.img"
    window = 'json:{"driver":"raw","offset":1024,"size":4096,"file":{"driver":"file","filename":"s.img"}}'
    r = img("info", "--output=json", window)
    data = json.loads(r.out)
    assert data["virtual-size"] == 4096
    assert data["filename"] == ('json:{"offset": 1024, "driver": "raw", "size": 4096, '
                                '"file": {"driver": "file", "filename": "s.img"}}')
    r = img("info", "--image-opts", "driver=null-co,size=1G")
    assert r.lines[:3] == ['image: json:{"driver": "null-co", "size": "1G"}', "file format: null-co",
                           "virtual size: 1 GiB (1073741824 bytes)"]


def test_info_works_on_an_image_in_use(image: Path) -> None:
    # info takes no permission at all, so even a user that shares nothing does not stop it ...
    with blockgraph.open("s.img", "raw") as disk:
        disk.blk.set_perm(disk.blk.perm, blockgraph.Perm.NONE)
        assert img("info", "s.img").rc == 0
        assert img("info", "-U", "s.img").rc == 0
        # ... while map, which reads, is refused with the lock error and a hint naming -U.
        r = img("map", "s.img")
        assert r.rc == 1 and "Is another process using the image [s.img]?" in r.err
        assert "-U" not in r.err  # qemu-img 7.2 prints only QEMU's lock hint


@pytest.mark.parametrize(("args", "rc", "err"), [
    (["nonexist.img"], 1, "qemu-img: Could not open 'nonexist.img': Could not open 'nonexist.img': "
                          "No such file or directory\n"),
    (["--output=xml", "s.img"], 1, "qemu-img: --output must be used with human or json as argument.\n"),
    (["-f", "nosuch", "s.img"], 1, "qemu-img: Could not open 's.img': Unknown driver 'nosuch'\n"),
    (["--image-opts", "-f", "raw", "driver=raw"], 1, "qemu-img: --image-opts and --format are mutually "
                                                     "exclusive\n"),
    ([], 1, "qemu-img: Expecting one image file name\n" + USAGE_TAIL),
    (["a", "b"], 1, "qemu-img: Expecting one image file name\n" + USAGE_TAIL),
])
def test_errors(image: Path, args: list[str], rc: int, err: str) -> None:
    r = img("info", *args)
    assert (r.rc, r.out, r.err) == (rc, "", err)


def test_driver_info_feeds_image_info_and_format_specific(image: Path) -> None:
    from blockgraph.cli import img_info

    class Fake:
        name = "fake"
        cluster_size = 65536

        def info(self) -> dict:
            return {"compat": "1.1", "lazy-refcounts": False, "dirty-flag": True, "encrypted": True}

    import asyncio

    info = asyncio.run(img_info.image_info(_FakeNode(Fake()), "f.img"))
    assert info["cluster-size"] == 65536 and info["dirty-flag"] is True and info["encrypted"] is True
    assert info["format-specific"] == {"type": "fake", "data": {"compat": "1.1", "lazy-refcounts": False}}
    lines = img_info.human(info)
    assert lines[4:] == ["encrypted: yes", "cluster_size: 65536", "cleanly shut down: no",
                         "Format specific information:", "    compat: 1.1", "    lazy refcounts: false"]


class _FakeNode:
    """The attributes of a Node that image_info reads."""

    def __init__(self, driver: object) -> None:
        self.driver, self.length, self.file, self.filtered = driver, 1 << 20, None, None
        self.kind = blockgraph.DriverKind.FORMAT

    @property
    def driver_name(self) -> str:
        return "fake"

    def cow_child(self) -> None:
        return None

    def primary(self) -> None:
        return None
