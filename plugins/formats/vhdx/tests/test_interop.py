"""vhdx against real qemu-img/qemu-io, both ways, and its conformance run."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from blockgraph.testing import DriverContract
from vhdx_helpers import bg, commands, needs_qemu, run

MiB = 1 << 20


class TestVhdxDynamic(DriverContract):
    driver = "vhdx"
    persistent = True
    supports_truncate = False
    size = 4 * MiB

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        path = tmp_path / "c.vhdx"
        bg("img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, str(size))
        return {"file": {"driver": "file", "filename": str(path)}}


class TestVhdxFixed(TestVhdxDynamic):
    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        path = tmp_path / "f.vhdx"
        bg("img", "create", "-q", "-f", "vhdx", "-o", "subformat=fixed,block_state_zero=off", path, str(size))
        return {"file": {"driver": "file", "filename": str(path)}}


def _pattern_writes(seed: int, size: int, count: int) -> list[tuple[int, int, int]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        length = rnd.choice([512, 4096, 65536, 3 * MiB // 2])
        off = rnd.randrange(0, size - length) // 512 * 512
        out.append((rnd.randrange(1, 255), off, length))
    return out


@needs_qemu
@pytest.mark.parametrize("opts", ["", "subformat=fixed", "block_size=1M,block_state_zero=off",
                                  "subformat=fixed,block_state_zero=off", "log_size=2M,block_size=32M"])
def test_qemu_written_images_read_identically(tmp_path: Path, opts: str) -> None:
    img, want, got = tmp_path / "q.vhdx", tmp_path / "want.raw", tmp_path / "got.raw"
    run("qemu-img", "create", "-q", "-f", "vhdx", *(["-o", opts] if opts else []), img, "40M")
    cmds = [f"write -P {p} {o} {n}" for p, o, n in _pattern_writes(len(opts), 40 * MiB, 12)]
    cmds.append("write -z 20M 2M")
    run("qemu-io", "-f", "vhdx", *commands(cmds), img)
    run("qemu-img", "convert", "-f", "vhdx", "-O", "raw", img, want)
    bg("img", "convert", "-O", "raw", img, got)  # probed: no -f
    assert got.read_bytes() == want.read_bytes()


@needs_qemu
@pytest.mark.parametrize("opts", ["", "subformat=fixed", "block_size=1M,block_state_zero=off"])
def test_blockgraph_written_images_pass_qemu_check_and_compare(tmp_path: Path, opts: str) -> None:
    img, ref = tmp_path / "b.vhdx", tmp_path / "ref.raw"
    bg("img", "create", "-q", "-f", "vhdx", *(["-o", opts] if opts else []), img, "24M")
    ref.write_bytes(bytes(24 * MiB))
    writes = _pattern_writes(7 + len(opts), 24 * MiB, 15)
    bg("io", "-f", "vhdx", *commands([f"write -P {p} {o} {n}" for p, o, n in writes]), img)
    with open(ref, "r+b") as f:
        for p, o, n in writes:
            f.seek(o)
            f.write(bytes([p]) * n)
    check = run("qemu-img", "check", "-f", "vhdx", img)
    assert "No errors were found on the image." in check.stdout
    assert run("qemu-img", "compare", "-f", "vhdx", "-F", "raw", img, ref).stdout.strip() == "Images are identical."


@needs_qemu
def test_info_and_create_match_qemu(tmp_path: Path) -> None:
    for size in ("1000", "100M", "2G"):
        ours, theirs = tmp_path / f"o{size}.vhdx", tmp_path / f"t{size}.vhdx"
        out = bg("img", "create", "-f", "vhdx", ours, size).stdout
        ref = run("qemu-img", "create", "-f", "vhdx", theirs, size).stdout
        assert out.replace(str(ours), "X") == ref.replace(str(theirs), "X")
        mine = bg("img", "info", ours).stdout.replace(str(ours), "X").splitlines()
        real = run("qemu-img", "info", theirs).stdout.replace(str(theirs), "X").splitlines()
        assert [line for line in mine if not line.startswith("disk size")] == \
               [line for line in real if not line.startswith("disk size")]
        assert ours.stat().st_size == theirs.stat().st_size


@needs_qemu
@pytest.mark.parametrize(("opts", "message"), [
    ("block_size=3M", "Block size must be a power of two"),
    ("log_size=0", "Log size must be a multiple of 1 MB"),
    ("subformat=differencing", "Parameter 'subformat' does not accept value 'differencing'"),
])
def test_create_refusals_match_qemu(tmp_path: Path, opts: str, message: str) -> None:
    theirs = run("qemu-img", "create", "-f", "vhdx", "-o", opts, tmp_path / "t.vhdx", "1M", ok=False)
    ours = bg("img", "create", "-f", "vhdx", "-o", opts, tmp_path / "o.vhdx", "1M", ok=False)
    assert theirs.returncode == ours.returncode == 1
    assert message in theirs.stderr and message in ours.stderr
