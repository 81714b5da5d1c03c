"""img convert between every pair of installed formats, checked by real qemu-img against the source data.

Each source image is made by blockgraph from one raw pattern; every conversion's output must compare
identical with that raw data under `qemu-img compare` (which reads the output with QEMU's own driver).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from blockgraph.plugins import PluginHost

CANDIDATES = ("raw", "qcow2", "vmdk", "vpc", "vdi", "vhdx")
SIZE = 4 << 20  # vpc keeps this size exactly (a whole CHS geometry)


def _installed() -> list[str]:
    host = PluginHost()
    return [f for f in CANDIDATES if f in host.drivers]


FORMATS = _installed()
pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) not installed")


def _bg(*args: str | Path) -> None:
    p = subprocess.run([sys.executable, "-m", "blockgraph.cli.main", *map(str, args)], capture_output=True, text=True)
    assert p.returncode == 0, f"blockgraph {args}: {p.stderr}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    work = tmp_path_factory.mktemp("matrix")
    raw = work / "pattern.raw"
    rnd = random.Random(4)
    data = bytearray(SIZE)
    for _ in range(24):
        off = rnd.randrange(0, SIZE - 65536) // 512 * 512
        n = rnd.choice([512, 4096, 65536])
        data[off:off + n] = bytes([rnd.randrange(1, 256)]) * n
    raw.write_bytes(data)
    out = {}
    for fmt in FORMATS:
        path = work / f"src.{fmt}"
        _bg("img", "convert", "-f", "raw", "-O", fmt, raw, path)
        out[fmt] = path
    return raw, out


@pytest.mark.parametrize("dst", FORMATS)
@pytest.mark.parametrize("src", FORMATS)
def test_convert_pair(tmp_path: Path, sources: tuple[Path, dict[str, Path]], src: str, dst: str) -> None:
    raw, images = sources
    out = tmp_path / f"out.{dst}"
    _bg("img", "convert", "-O", dst, images[src], out)  # source format probed
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", dst, raw, out], capture_output=True, text=True)
    assert cmp.returncode == 0, f"{src} -> {dst}: {cmp.stdout}{cmp.stderr}"
