"""``img map`` against ``qemu-img map`` on partly written images of every format qemu-img and qemu-io made.

QEMU asks the file where a format's data reads as zeros only when the driver says BDRV_BLOCK_RECURSE (flat vmdk
extents, fixed vpc, static vdi, qcow2 with metadata preallocation). vhdx is left out on purpose: QEMU 7.2's
vhdx driver has no block status (its human map fails, its JSON map calls everything data), while blockgraph's
answers from the BAT (see plugins/formats/vhdx/README.md); its own test below checks that answer.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers_img import img

pytestmark = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-io")),
                                reason="needs qemu-img and qemu-io")

# Data, an explicit zero write, a 4 KiB write inside a larger block and a data write of zeros.
WRITES = ["write -P 0x11 0 64k", "write -z 1M 64k", "write -P 0x22 2M 4k", "write -P 0 3M 64k", "write -P 0x33 6M 512"]

CASES = [
    ("vpc", []), ("vpc", ["-o", "subformat=fixed"]), ("vdi", []), ("vdi", ["-o", "static=on"]),
    ("vmdk", []), ("vmdk", ["-o", "subformat=monolithicFlat"]),
    ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"]), ("qcow2", []), ("qcow2", ["-o", "preallocation=metadata"]),
    ("qcow2", ["-o", "cluster_size=512"]),
]


def _qemu_img(*args: str) -> tuple[int, str, str]:
    p = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize(("fmt", "opts"), CASES, ids=[f"{f}-{'-'.join(o[1:]) or 'default'}" for f, o in CASES])
def test_map_equals_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, opts: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    name = f"t.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *opts, name, "8M"], check=True)
    cmds = [a for w in WRITES for a in ("-c", w)]
    subprocess.run(["qemu-io", "-f", fmt, *cmds, name], check=True, capture_output=True)
    for output in ("human", "json"):
        want = _qemu_img("map", f"--output={output}", name)
        got = img("map", f"--output={output}", name)
        assert (got.rc, got.out, got.err) == want, output


def test_vhdx_map_follows_the_bat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks qemu-io wrote are data at their host offsets; blocks it never wrote read as zeros."""
    import json

    monkeypatch.chdir(tmp_path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", "t.vhdx", "8M"], check=True)
    cmds = [a for w in WRITES for a in ("-c", w)]
    subprocess.run(["qemu-io", "-f", "vhdx", *cmds, "t.vhdx"], check=True, capture_output=True)
    got = img("map", "--output=json", "t.vhdx")
    assert got.rc == 0, got.err
    data_blocks = set()
    for extent in json.loads(got.out):
        if extent["data"]:
            assert "offset" in extent
            data_blocks.update(range(extent["start"] >> 20, (extent["start"] + extent["length"] - 1 >> 20) + 1))
    assert data_blocks == {0, 1, 2, 3, 6}  # qemu-io's writes (the zero write allocates too) and nothing else
