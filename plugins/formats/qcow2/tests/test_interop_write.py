"""Images blockgraph creates and writes pass ``qemu-img check`` (no errors, no leaks) and compare identical."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from blockgraph import sync
from blockgraph_qcow2.testing import (
    HAVE_QEMU,
    assert_clean,
    assert_same_as,
    bg_create,
    qemu_img,
    qemu_io,
    random_workload,
)

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io not installed")

SIZE = 4 << 20


def assert_clean_and_equal(path: Path, model: bytes | bytearray, tmp_path: Path) -> None:
    assert_clean(path)
    assert_same_as(path, model, tmp_path)


CASES = {
    "v3": {},
    "v2": {"compat": "0.10"},
    "c512-rc1": {"cluster_size": "512", "refcount_bits": "1"},
    "c4k-rc64": {"cluster_size": "4k", "refcount_bits": "64"},
    "c2M": {"cluster_size": "2M"},
    "extl2": {"extended_l2": "on", "cluster_size": "32k"},
    "lazy": {"lazy_refcounts": "on"},
    "zstd": {"compression_type": "zstd"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_writes_pass_check(case: str, tmp_path: Path) -> None:
    path = bg_create(tmp_path / "img.qcow2", SIZE, **CASES[case])
    model = bytearray(SIZE)
    with sync.open(str(path), "qcow2") as img:
        random_workload(img, model, seed=hash(case) & 0xFFFF)
        assert img.read(0, SIZE) == model
    assert_clean_and_equal(path, model, tmp_path)


def test_writes_over_qemu_backing_chain(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(SIZE))
    qemu_io(base, "write -P 0x5a 0 4M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    model = bytearray(b"\x5a" * SIZE)
    with sync.open(str(top)) as img:
        random_workload(img, model, seed=7)
    r = qemu_img("check", str(top), check=False)
    assert r.returncode == 0, r.stdout
    raw = tmp_path / "model.raw"
    raw.write_bytes(bytes(model))
    assert qemu_img("compare", "-F", "qcow2", str(raw), str(top), check=False).returncode == 0


@pytest.mark.parametrize("mode", ["off", "metadata", "falloc", "full"])
def test_preallocation_and_resize(mode: str, tmp_path: Path) -> None:
    path = bg_create(tmp_path / "img.qcow2", 1 << 20, preallocation=mode)
    r = qemu_img("check", str(path), check=False)
    assert r.returncode == 0, r.stdout
    model = bytearray(1 << 20)
    with sync.open(str(path)) as img:
        img.write(1000, b"\x42" * 5000)
        model[1000:6000] = b"\x42" * 5000
        img.truncate(3 << 20, prealloc=mode)
        model += bytes(2 << 20)
        img.write((3 << 20) - 4096, b"\x43" * 4096)
        model[-4096:] = b"\x43" * 4096
    assert_clean_and_equal(path, model, tmp_path)
    with sync.open(str(path)) as img:
        img.truncate(512 * 1024)
    assert_clean_and_equal(path, model[:512 * 1024], tmp_path)
    assert qemu_img("info", str(path)).stdout.count("524288 bytes") == 1


def test_create_matches_qemu_img_layout(tmp_path: Path) -> None:
    """The same options give the same bytes as qemu-img create (header, extensions, refcount table, L1)."""
    for opts in ({}, {"compat": "0.10"}, {"cluster_size": "4k", "lazy_refcounts": "on"},
                 {"extended_l2": "on", "compression_type": "zstd", "refcount_bits": "8"}):
        ours = bg_create(tmp_path / "ours.qcow2", 1 << 30, **opts)
        theirs = tmp_path / "theirs.qcow2"
        o = ",".join(f"{k}={v}" for k, v in opts.items())
        qemu_img("create", "-q", "-f", "qcow2", *(["-o", o] if o else []), str(theirs), "1G")
        assert ours.read_bytes() == theirs.read_bytes(), opts


@pytest.mark.parametrize("spec", ["preallocation=off,cluster_size=512 1G", "preallocation=off,cluster_size=512,"
                                  "refcount_bits=1 4G", "preallocation=metadata,cluster_size=512 16M",
                                  "preallocation=metadata,cluster_size=4k,refcount_bits=1 16M",
                                  "preallocation=falloc,cluster_size=512,refcount_bits=64 8M",
                                  "preallocation=full 3M", "preallocation=metadata,cluster_size=1k,refcount_bits=8 8M"])
def test_create_layout_with_refcount_growth_matches_qemu_img(spec: str, tmp_path: Path) -> None:
    """Refcount blocks and table growth land where qemu-img puts them (its allocation order, ported)."""
    opts, size = spec.split()
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    bg_create(ours, int(qemu_img_size(size)), **dict(kv.split("=") for kv in opts.split(",")))
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(theirs), size)
    assert ours.read_bytes() == theirs.read_bytes()


def qemu_img_size(text: str) -> int:
    from blockgraph.options import parse_size

    return parse_size(text)


def test_create_with_backing_matches_qemu_img(tmp_path: Path) -> None:
    base = bg_create(tmp_path / "base.qcow2", 1 << 20)
    ours = bg_create(tmp_path / "ours.qcow2", 1 << 20, backing_file="base.qcow2", backing_fmt="qcow2")
    theirs = tmp_path / "theirs.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(theirs), "1M")
    assert base.exists()
    assert ours.read_bytes() == theirs.read_bytes()


def test_data_file_written_by_blockgraph(tmp_path: Path) -> None:
    path = bg_create(tmp_path / "img.qcow2", SIZE, data_file=str(tmp_path / "img.data"), data_file_raw="on")
    model = bytearray(SIZE)
    with sync.open(str(path)) as img:
        random_workload(img, model, seed=3, ops=30)
    assert_clean_and_equal(path, model, tmp_path)
    # data_file_raw: the data file alone is the disk.
    assert (tmp_path / "img.data").read_bytes()[:SIZE].ljust(SIZE, b"\0") == model


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_convert_and_overwrite(ctype: str, tmp_path: Path) -> None:
    """``img convert -c`` output passes qemu-img check and compare; partial overwrites copy from compressed data."""
    import subprocess
    import sys

    rng = random.Random(5)
    words = [bytes(rng.choice(b"abcdefgh") for _ in range(rng.randint(2, 9))) for _ in range(200)]
    text = bytearray()
    while len(text) < SIZE:
        text += rng.choice(words) + b" "
    model = bytearray(text[:SIZE - 65536] + rng.randbytes(65536))  # the last cluster does not compress
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(model))
    path = tmp_path / "img.qcow2"
    bg = Path(sys.executable).with_name("blockgraph")
    subprocess.run([str(bg), "img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype},refcount_bits=1",
                    str(src), str(path)], check=True)
    info = qemu_img("check", str(path)).stdout
    assert "compressed clusters" in info and " 0.00% compressed" not in info
    assert_clean_and_equal(path, model, tmp_path)
    with sync.open(str(path), options={"discard": "unmap"}) as img:
        img.write(70000, b"\x01" * 100)
        model[70000:70100] = b"\x01" * 100
        img.write_zeroes(131072, 65536)
        model[131072:196608] = bytes(65536)
        img.discard(196608, 65536)
        model[196608:262144] = bytes(65536)
    assert_clean_and_equal(path, model, tmp_path)


@pytest.mark.parametrize("opts", ["", "compat=0.10", "extended_l2=on", "cluster_size=4k"])
def test_same_qemu_io_commands_give_the_same_image(opts: str, tmp_path: Path) -> None:
    """qemu-io commands run by ``blockgraph io`` leave the same map (host offsets included) as by qemu-io."""
    import json
    import subprocess
    import sys

    cmds = ["write -P 1 0 64k", "write -P 2 100k 3k", "write -z 2M 64k", "write -z 3M 4k", "write -P 3 3200k 200k",
            "discard 3200k 64k", "write -z 1M 10k", "write -P 4 4190208 4096"]
    bg = Path(sys.executable).with_name("blockgraph")
    maps = []
    for tool in ("qemu", "bg"):
        path = tmp_path / f"{tool}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), str(path), str(SIZE))
        if tool == "qemu":
            qemu_io(path, *cmds)
        else:
            argv = [str(bg), "io", "-f", "qcow2"]
            for c in cmds:
                argv += ["-c", c]
            subprocess.run([*argv, str(path)], check=True, capture_output=True)
        maps.append(json.loads(qemu_img("map", "--output=json", str(path)).stdout))
        assert qemu_img("check", str(path), check=False).returncode == 0
    assert maps[1] == maps[0]
    assert qemu_img("compare", str(tmp_path / "qemu.qcow2"), str(tmp_path / "bg.qcow2"), check=False).returncode == 0
