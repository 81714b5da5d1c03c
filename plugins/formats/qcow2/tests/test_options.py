"""Runtime options: QEMU's defaults, validation and error texts; img info's format-specific fields."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from blockgraph.errors import OptionError
from blockgraph.session import Session
from blockgraph_qcow2.options import Qcow2Options, cache_entries, cache_sizes
from blockgraph_qcow2.testing import HAVE_QEMU, bg_create, qemu_img


def _open(path: Path, **opts: Any) -> Any:
    async def run() -> Any:
        session = Session()
        try:
            node = await session.open_node({"driver": "qcow2", "file": {"driver": "file", "filename": str(path)},
                                            **opts})
            img = node.driver.img
            return img.l2_cache.capacity, img.l2_cache.table_size, img.rc.cache.capacity
        finally:
            await session.close()

    return asyncio.run(run())


@pytest.mark.parametrize("opts,message", [
    ({"cache-size": "1M", "l2-cache-size": "512k", "refcount-cache-size": "256k"},
     "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"),
    ({"cache-size": "1M", "l2-cache-size": "2M"}, "l2-cache-size may not exceed cache-size"),
    ({"cache-size": "1M", "refcount-cache-size": "2M"}, "refcount-cache-size may not exceed cache-size"),
    ({"l2-cache-entry-size": "100"}, "L2 cache entry size must be a power of two between 512 and the cluster size "
                                     "(65536)"),
    ({"l2-cache-entry-size": "128k"}, "L2 cache entry size must be a power of two between 512 and the cluster "
                                      "size (65536)"),
])
def test_cache_option_errors(tmp_path: Path, opts: dict[str, str], message: str) -> None:
    path = bg_create(tmp_path / "img.qcow2", 1 << 30)
    with pytest.raises(OptionError) as e:
        _open(path, **opts)
    assert str(e.value) == message


def test_cache_defaults_follow_qemu() -> None:
    o = Qcow2Options()
    # 1 GiB at 64 KiB clusters: the L2 cache covers the whole image (2 tables = 32 slices of 4 KiB),
    # refcount cache 4 clusters.
    l2, entry, rc = cache_sizes(o, 65536, 1 << 30, 8)
    assert (l2, entry, rc) == (131072, 4096, 262144)
    assert cache_entries(l2, entry, rc, 65536) == (32, 4)
    # A huge image: capped at 32 MiB of L2 tables.
    assert cache_sizes(o, 65536, 1 << 50, 8)[0] == 32 << 20
    # cache-size alone: the L2 share covers the image, the rest goes to refcounts.
    l2, _, rc = cache_sizes(Qcow2Options(cache_size=4 << 20), 65536, 1 << 30, 8)
    assert (l2, rc) == (131072, (4 << 20) - 131072)


def test_cache_is_bounded_by_the_options(tmp_path: Path) -> None:
    path = bg_create(tmp_path / "img.qcow2", 64 << 30)
    # 8 MiB of L2 tables for 64 GiB, held in 2048 slices of 4 KiB (QEMU's default entry size)
    assert _open(path) == (2048, 4096, 4)
    assert _open(path, **{"l2-cache-size": "256k", "refcount-cache-size": "512k"}) == (64, 4096, 8)
    assert _open(path, **{"l2-cache-size": "256k", "l2-cache-entry-size": "64k"}) == (4, 65536, 4)
    assert _open(path, **{"l2-cache-size": "1k", "l2-cache-entry-size": "512"}) == (2, 512, 4)
    assert _open(path, **{"l2-cache-size": "512", "l2-cache-entry-size": "512"}) == (2, 512, 4)  # QEMU's minimum


def test_lazy_refcounts_need_v3(tmp_path: Path) -> None:
    path = bg_create(tmp_path / "img.qcow2", 1 << 20, compat="0.10")
    with pytest.raises(OptionError, match=r"Lazy refcounts require a qcow2 image with at least qemu 1\.1"):
        _open(path, **{"lazy-refcounts": "on"})


@pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img not installed")
@pytest.mark.parametrize("opts", ["", "compat=0.10", "lazy_refcounts=on,compression_type=zstd,extended_l2=on",
                                  "refcount_bits=64,cluster_size=4k"])
def test_info_matches_qemu_img(opts: str, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    path = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", *(["-o", opts] if opts else []),
             str(path), "2M")
    bg = Path(sys.executable).with_name("blockgraph")
    for args in (["--output=json"], [], ["--backing-chain", "--output=json"]):
        ours = subprocess.run([str(bg), "img", "info", *args, str(path)], capture_output=True, text=True, check=True)
        theirs = qemu_img("info", *args, str(path))
        if "--output=json" in args:
            assert json.loads(ours.stdout) == json.loads(theirs.stdout)
        else:
            assert ours.stdout == theirs.stdout
