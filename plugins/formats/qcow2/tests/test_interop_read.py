"""Images qemu-img creates and qemu-io writes read byte-identically to ``qemu-img convert -O raw``."""

from __future__ import annotations

from pathlib import Path

import pytest
from blockgraph import sync
from blockgraph_qcow2.testing import HAVE_QEMU, qemu_img, qemu_io

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io not installed")

SIZE = 4 << 20
WRITES = ("write -P 0x11 0 100k", "write -P 0x22 1000 3000", "write -P 0x33 1M 64k", "write -z 2M 128k",
          "write -P 0x44 2200k 5k", "write -P 0x55 3M 200k", "discard 3M 64k", "write -P 0x66 4186112 8192")


def assert_reads_like_qemu(path: Path, tmp_path: Path, fmt: str = "qcow2") -> None:
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", str(path), str(ref))
    expected = ref.read_bytes()
    with sync.open(str(path), read_only=True) as img:
        assert img.format == "qcow2"
        assert img.length == len(expected)
        got = img.read(0, img.length)
        # Unaligned reads across cluster boundaries too.
        assert img.read(1000, 70000) == expected[1000:71000]
        assert img.read(2200 * 1024 - 7, 5 * 1024 + 14) == expected[2200 * 1024 - 7:2205 * 1024 + 7]
    assert got == expected


CREATE_CASES = {
    "v3": [],
    "v2": ["-o", "compat=0.10"],
    "c512": ["-o", "cluster_size=512"],
    "c2M": ["-o", "cluster_size=2M"],
    "rc1": ["-o", "refcount_bits=1"],
    "rc64": ["-o", "refcount_bits=64"],
    "extl2": ["-o", "extended_l2=on"],
    "extl2-32k": ["-o", "extended_l2=on,cluster_size=32k"],
    "lazy": ["-o", "lazy_refcounts=on"],
    "prealloc-metadata": ["-o", "preallocation=metadata"],
    "prealloc-falloc": ["-o", "preallocation=falloc"],
    "prealloc-full": ["-o", "preallocation=full"],
}


@pytest.mark.parametrize("case", sorted(CREATE_CASES))
def test_qemu_written_images(case: str, tmp_path: Path) -> None:
    path = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", *CREATE_CASES[case], str(path), str(SIZE))
    qemu_io(path, *WRITES)
    assert_reads_like_qemu(path, tmp_path)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed(ctype: str, tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = bytearray(SIZE)
    for i in range(0, SIZE, 4096):
        data[i:i + 40] = f"block {i:10d} compressible text........".encode()
    data[SIZE // 2:SIZE // 2 + 70000] = bytes(range(256)) * 273 + bytes(70000 - 256 * 273)
    src.write_bytes(bytes(data))
    path = tmp_path / "img.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", str(src), str(path))
    assert_reads_like_qemu(path, tmp_path)
    # An overwrite of part of a compressed cluster keeps the rest of it.
    qemu_io(path, "write -P 0x77 5000 100")
    assert_reads_like_qemu(path, tmp_path)


def test_backing_chain_of_three(tmp_path: Path) -> None:
    base, mid, top = tmp_path / "base.qcow2", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(SIZE))
    qemu_io(base, "write -P 1 0 4M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(mid))
    qemu_io(mid, "write -P 2 64k 64k", "write -P 3 1000 100", "write -z 1M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "mid.qcow2", "-F", "qcow2", str(top))
    qemu_io(top, "write -P 4 70000 10", "discard 2M 64k", "write -P 5 3M 4k")
    assert_reads_like_qemu(top, tmp_path)


def test_backing_of_another_format_and_shorter(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x09" * (1 << 20))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top), str(SIZE))
    qemu_io(top, "write -P 7 900k 200k")
    assert_reads_like_qemu(top, tmp_path)


@pytest.mark.parametrize("raw", ["on", "off"])
def test_external_data_file(raw: str, tmp_path: Path) -> None:
    path = tmp_path / "img.qcow2"
    opts = f"data_file={tmp_path / 'img.data'},data_file_raw={raw}"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(path), str(SIZE))
    qemu_io(path, "write -P 0x12 0 100k", "write -P 0x34 2M 4k", "write -z 3M 64k")
    assert_reads_like_qemu(path, tmp_path)


def test_block_status_matches_qemu_map(tmp_path: Path) -> None:
    """``img map`` through block status gives qemu-img's JSON map, allocation depth included."""
    import json
    import subprocess
    import sys

    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(SIZE))
    qemu_io(base, "write -P 1 0 1M", "write -z 2M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    qemu_io(top, "write -P 2 512k 64k", "write -z 3M 128k")
    want = json.loads(qemu_img("map", "--output=json", str(top)).stdout)
    bg = Path(sys.executable).with_name("blockgraph")
    got = json.loads(subprocess.run([str(bg), "img", "map", "--output=json", str(top)], capture_output=True,
                                    text=True, check=True).stdout)
    assert got == want
