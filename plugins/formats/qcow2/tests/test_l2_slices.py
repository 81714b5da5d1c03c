"""``l2-cache-entry-size``: the L2 cache holds table slices, as QEMU's, and every metadata path works on them.

The workloads run with 512-byte slices and a cache of two of them, so nearly every L2 access misses, crosses
a slice boundary or evicts; the results are checked with the real qemu-img.
"""

from __future__ import annotations

import subprocess
import sys
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

TINY = {"l2-cache-entry-size": "512", "l2-cache-size": "1k"}
CASES = {
    # (create options, image size): one table of 16 slices; eight tables of 8 slices; 16-byte entries.
    "c64k": ({}, 64 << 20),
    "c4k": ({"cluster_size": "4k"}, 16 << 20),
    "extl2": ({"extended_l2": "on", "cluster_size": "32k"}, 32 << 20),
    "v2": ({"compat": "0.10"}, 64 << 20),
}


def image_opts(path: Path, **extra: str) -> str:
    return ",".join([f"driver=qcow2,file.filename={path}", *(f"{k}={v}" for k, v in {**TINY, **extra}.items())])


def bg(*args: str) -> str:
    exe = Path(sys.executable).with_name("blockgraph")
    r = subprocess.run([str(exe), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def workload(img: sync.Image, model: bytearray, seed: int, ops: int = 80) -> None:
    random_workload(img, model, seed, ops, sizes=(1, 4096, 65536, 300000, 1 << 20, 5 << 20))


def assert_equal(path: Path, model: bytes | bytearray, tmp_path: Path, *snapshot: str) -> None:
    if not snapshot:
        assert_same_as(path, model, tmp_path)
        return
    out = tmp_path / "snap.raw"
    qemu_img("convert", "-l", f"snapshot.name={snapshot[0]}", "-O", "raw", str(path), str(out))
    assert out.read_bytes() == bytes(model)


@pytest.mark.parametrize("case", sorted(CASES))
def test_workload_snapshots_and_resize_with_tiny_slices(case: str, tmp_path: Path) -> None:
    create, size = CASES[case]
    path = bg_create(tmp_path / "img.qcow2", size, **create)
    model = bytearray(size)
    with sync.open(str(path), "qcow2", options=TINY) as img:
        cache = img.blk.node.driver.img.l2_cache
        assert (cache.table_size, cache.capacity) == (512, 2)
        workload(img, model, seed=len(case))
        assert img.read(0, size) == model
        assert len(cache) <= 2
    assert_clean(path)
    assert_equal(path, model, tmp_path)

    # A snapshot shares every L2 table; the writes after it copy tables slice by slice.
    bg("img", "snapshot", "--image-opts", "-c", "before", image_opts(path))
    first = bytes(model)
    with sync.open(str(path), "qcow2", options=TINY) as img:
        workload(img, model, seed=len(case) + 1, ops=40)
    assert_clean(path)
    assert_equal(path, model, tmp_path)
    assert_equal(path, first, tmp_path, "before")

    bg("img", "snapshot", "--image-opts", "-d", "before", image_opts(path))
    assert_clean(path)
    bg("img", "resize", "--image-opts", "--preallocation=metadata", image_opts(path), str(size * 2))
    model += bytes(size)
    assert_clean(path)
    assert_equal(path, model, tmp_path)


def test_compressed_writes_and_zero_expansion_with_tiny_slices(tmp_path: Path) -> None:
    path = bg_create(tmp_path / "img.qcow2", 16 << 20, cluster_size="4k")
    opts = image_opts(path)
    bg("io", "--image-opts", "-c", "write -c -P 7 0 1M", "-c", "write -P 8 1M 1M", "-c", "write -z 2M 1M", opts)
    qemu_io(path, "read -P 7 0 1M", "read -P 8 1M 1M", "read -P 0 2M 1M")
    # compat=0.10 has no zero flag: amend rewrites the zero clusters of every slice.
    bg("img", "amend", "--image-opts", "-o", "compat=0.10", opts)
    assert_clean(path)
    qemu_io(path, "read -P 7 0 1M", "read -P 8 1M 1M", "read -P 0 2M 1M")


def test_a_miss_reads_one_slice(tmp_path: Path) -> None:
    """Default entry size min(cluster, 4 KiB): reading one byte of a 2 MiB-cluster image caches 4 KiB of L2."""
    path = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", str(path), "64G")
    qemu_io(path, "write -P 9 40G 4k")
    with sync.open(str(path), "qcow2", read_only=True) as img:
        assert img.read(40 << 30, 4096) == b"\x09" * 4096
        cache = img.blk.node.driver.img.l2_cache
        assert cache.table_size == 4096
        assert list(cache.entries) == [o for o in cache.entries if o % 4096 == 0] and len(cache) == 1
    with sync.open(str(path), "qcow2", read_only=True, options={"l2-cache-entry-size": "2M"}) as img:
        assert img.read(40 << 30, 4096) == b"\x09" * 4096
        assert img.blk.node.driver.img.l2_cache.table_size == 2 << 20


def test_metadata_preallocation_never_shows_freed_data(tmp_path: Path) -> None:
    """Growing with preallocation=metadata may map clusters freed earlier and not discarded: they read zeros.

    qemu-img 7.2 maps them as they are, and its grown area shows the old bytes; blockgraph zeroes them first.
    """
    path = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(path), "1M")
    qemu_io(path, "write -P 0x66 0 1M")
    qemu_img("snapshot", "-c", "s", str(path))
    qemu_io(path, "write -P 0x77 0 1M")
    # Deleting without discard leaves the 1 MiB of 0x66 clusters free but intact inside the file.
    qemu_img("snapshot", "--image-opts", "-d", "s", f"driver=qcow2,file.filename={path},pass-discard-snapshot=off")
    theirs = tmp_path / "theirs.qcow2"
    theirs.write_bytes(path.read_bytes())
    qemu_img("resize", "-q", "--preallocation=metadata", str(theirs), "3M")
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0 1M 2M", str(theirs)], capture_output=True,
                       text=True)
    assert "Pattern verification failed" in r.stdout
    bg("img", "resize", "--preallocation=metadata", str(path), "3M")
    assert_clean(path)
    qemu_io(path, "read -P 0x77 0 1M", "read -P 0 1M 2M")
    assert '"data": false' not in qemu_img("map", "--output=json", str(path)).stdout  # still preallocated
