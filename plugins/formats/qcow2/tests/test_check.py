"""``blockgraph img check`` on qcow2 against ``qemu-img check``: same lines, same exit codes, repairs that hold."""

from __future__ import annotations

import contextlib
import io
import struct
from pathlib import Path

import pytest
from blockgraph_qcow2.testing import HAVE_QEMU, qemu_img, qemu_io

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io not installed")
CS = 65536


def bg(*args: str) -> tuple[int, str, str]:
    from blockgraph.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["img", *args])
    return rc, out.getvalue(), err.getvalue()


def same_as_qemu(*args: str) -> tuple[int, str, str]:
    """Run ``check ARGS`` with both tools (read-only): identical exit code, stdout and stderr."""
    real = qemu_img("check", *args, check=False)
    mine = bg("check", *args)
    assert mine == (real.returncode, real.stdout, real.stderr)
    return mine


def refblock0(path: Path) -> int:
    data = path.read_bytes()
    rt_off = struct.unpack_from(">Q", data, 48)[0]
    return struct.unpack_from(">Q", data, rt_off)[0]


def poke_refcount(path: Path, cluster: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(refblock0(path) + 2 * cluster)
        f.write(struct.pack(">H", value))


def l2_entry0(path: Path) -> tuple[int, int]:
    """(file offset of the first L2 entry, its value)."""
    data = path.read_bytes()
    l1_off = struct.unpack_from(">Q", data, 40)[0]
    l2_off = struct.unpack_from(">Q", data, l1_off)[0] & 0x00FFFFFFFFFFFE00
    return l2_off, struct.unpack_from(">Q", data, l2_off)[0]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "4M")
    qemu_io(p, "write -P 1 0 128k", "write -P 2 1M 64k", "write -z 2M 64k")
    return p


def test_clean_image_human_and_json(image: Path) -> None:
    assert same_as_qemu(str(image))[0] == 0
    assert same_as_qemu("--output=json", str(image))[0] == 0
    assert same_as_qemu("-q", str(image))[0] == 0


def test_snapshots_compressed_and_fragmentation(image: Path, tmp_path: Path) -> None:
    qemu_img("snapshot", "-c", "s1", str(image))
    qemu_io(image, "write -P 3 0 64k", "write -c -P 4 3M 64k")
    assert same_as_qemu(str(image))[0] == 0
    assert same_as_qemu("--output=json", str(image))[0] == 0


def test_v2_and_small_clusters(tmp_path: Path) -> None:
    p = tmp_path / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4k", str(p), "1M")
    qemu_io(p, "write -P 5 4k 12k")
    assert same_as_qemu(str(p))[0] == 0


def test_leak_reported_and_repaired(image: Path) -> None:
    clusters = image.stat().st_size // CS
    with open(image, "ab") as f:
        f.write(bytes(CS))
    poke_refcount(image, clusters, 1)
    rc, _, err = same_as_qemu(str(image))
    assert rc == 3 and err == f"Leaked cluster {clusters} refcount=1 reference=0\n"
    assert same_as_qemu("--output=json", str(image))[0] == 3
    rc, out, err = bg("check", "-r", "leaks", str(image))
    assert rc == 0
    assert out.startswith("The following inconsistencies were found and repaired:\n\n    1 leaked clusters\n"
                          "    0 corruptions\n\nDouble checking the fixed image now...\nNo errors were found")
    assert f"Repairing cluster {clusters} refcount=1 reference=0\n" in err
    assert qemu_img("check", str(image), check=False).returncode == 0


def test_corruption_reported_and_repaired(image: Path, tmp_path: Path) -> None:
    _, entry = l2_entry0(image)
    data_cluster = (entry & 0x00FFFFFFFFFFFE00) // CS
    poke_refcount(image, data_cluster, 0)
    rc, _, err = same_as_qemu(str(image))
    assert rc == 2
    assert f"ERROR cluster {data_cluster} refcount=0 reference=1\n" in err
    assert "ERROR OFLAG_COPIED data cluster: l2_entry=" in err
    copy = tmp_path / "copy.qcow2"
    copy.write_bytes(image.read_bytes())
    real = qemu_img("check", "-r", "leaks", str(copy), check=False)
    assert bg("check", "-r", "leaks", str(image)) == (real.returncode, real.stdout, real.stderr)  # must rebuild
    rc, out, err = bg("check", "-r", "all", str(image))
    assert rc == 0, out + err
    assert "Rebuilding refcount structure\n" in err
    assert qemu_img("check", str(image), check=False).returncode == 0
    raw = tmp_path / "want.raw"
    raw.write_bytes(b"\x01" * (128 << 10) + bytes((1 << 20) - (128 << 10)) + b"\x02" * CS + bytes((3 << 20) - CS))
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(raw), str(image), check=False).returncode == 0


def test_refcount_too_high_is_a_leak_and_copied_flag(image: Path) -> None:
    _, entry = l2_entry0(image)
    data_cluster = (entry & 0x00FFFFFFFFFFFE00) // CS
    poke_refcount(image, data_cluster, 2)
    rc, _, err = same_as_qemu(str(image))
    assert rc == 2 and "Leaked cluster" in err and "OFLAG_COPIED" in err
    assert bg("check", "-r", "all", str(image))[0] == 0
    assert qemu_img("check", str(image), check=False).returncode == 0


def test_l2_entry_beyond_the_file(image: Path) -> None:
    off, entry = l2_entry0(image)
    with open(image, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(">Q", (entry & ~0x00FFFFFFFFFFFE00) | (64 << 20)))
    rc, _, err = same_as_qemu(str(image))
    assert rc == 2 and "ERROR: counting reference for region exceeding the end of the file" in err


def test_dirty_lazy_refcount_image(tmp_path: Path) -> None:
    import subprocess

    from blockgraph_qcow2.testing import QEMU_IO

    p = tmp_path / "lazy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(p), "1M")
    subprocess.run([QEMU_IO, "-c", "write -P 7 0 64k", "-c", "abort", str(p)], capture_output=True)
    rc, _, _ = same_as_qemu(str(p))
    assert rc == 2
    theirs = tmp_path / "theirs.qcow2"
    theirs.write_bytes(p.read_bytes())
    real = qemu_img("check", "-r", "all", str(theirs), check=False)
    assert bg("check", "-r", "all", str(p)) == (real.returncode, real.stdout, real.stderr)  # not repaired at open
    assert real.returncode == 0
    assert "cleanly shut down: no" not in qemu_img("info", str(p)).stdout
    assert qemu_img("check", str(p), check=False).returncode == 0


def test_corrupt_bit_is_cleared_by_repair(image: Path, tmp_path: Path) -> None:
    data = bytearray(image.read_bytes())
    data[79] |= 0x02  # incompatible feature bit 1: corrupt
    image.write_bytes(data)
    theirs = tmp_path / "theirs.qcow2"
    theirs.write_bytes(data)
    assert "corrupt: true" in qemu_img("info", str(image)).stdout
    real = qemu_img("check", "-r", "all", str(theirs), check=False)
    assert bg("check", "-r", "all", str(image)) == (real.returncode, real.stdout, real.stderr)
    assert "corrupt: false" in qemu_img("info", str(image)).stdout


def test_dirty_image_is_repaired_on_read_write_open(tmp_path: Path) -> None:
    import subprocess

    from blockgraph.cli.main import main
    from blockgraph_qcow2.testing import QEMU_IO

    p = tmp_path / "lazy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(p), "1M")
    subprocess.run([QEMU_IO, "-c", "write -P 7 0 64k", "-c", "abort", str(p)], capture_output=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["io", "-c", "read -P 7 0 64k", str(p)]) == 0
    assert qemu_img("check", str(p), check=False).returncode == 0


def _fuzz_refcounts(src: Path, dst: Path, seed: int) -> None:
    import random

    rng = random.Random(seed)
    data = bytearray(src.read_bytes())
    order = struct.unpack_from(">I", data, 96)[0]
    bits = 1 << order
    rb = refblock0(src)
    for _ in range(rng.randint(1, 3)):
        c, v = rng.randrange(len(data) // CS), rng.choice([0, 1, 2]) & ((1 << bits) - 1)
        if bits >= 8:
            n = bits // 8
            data[rb + c * n:rb + (c + 1) * n] = v.to_bytes(n, "big")
        else:
            per, shift = 8 // bits, (c % (8 // bits)) * bits
            data[rb + c // per] = (data[rb + c // per] & ~(((1 << bits) - 1) << shift) & 0xFF) | (v << shift)
    dst.write_bytes(data)


@pytest.mark.parametrize("opts", ["refcount_bits=16", "refcount_bits=1", "refcount_bits=64,extended_l2=on"])
@pytest.mark.parametrize("seed", range(4))
def test_random_refcount_damage(tmp_path: Path, opts: str, seed: int) -> None:
    """Random refcount entries set to 0/1/2: the same report as qemu-img, and a repair qemu-img accepts."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(base), "8M")
    qemu_io(base, "write -P 1 0 300k", "write -z 1M 256k", "write -c -P 4 6M 64k")
    theirs, mine = tmp_path / "theirs.qcow2", tmp_path / "mine.qcow2"
    _fuzz_refcounts(base, theirs, seed)
    mine.write_bytes(theirs.read_bytes())
    same_as_qemu(str(mine))
    real = qemu_img("check", "-r", "all", str(theirs), check=False)
    assert bg("check", "-r", "all", str(mine))[0] == real.returncode
    assert qemu_img("check", str(mine), check=False).returncode == qemu_img("check", str(theirs),
                                                                             check=False).returncode
    assert qemu_img("compare", str(theirs), str(mine), check=False).returncode == 0


@pytest.mark.parametrize("entry", [1 << 30, 0x30100, 0, 0x10000])
@pytest.mark.parametrize("repair", [[], ["-r", "all"], ["-r", "leaks"]])
def test_damaged_refcount_table(tmp_path: Path, entry: int, repair: list[str]) -> None:
    """A refcount table entry outside the image, unaligned, missing or pointing at the header."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "4M")
    qemu_io(base, "write -P 1 0 128k")
    data = bytearray(base.read_bytes())
    struct.pack_into(">Q", data, struct.unpack_from(">Q", data, 48)[0], entry)
    theirs, mine = tmp_path / "theirs.qcow2", tmp_path / "mine.qcow2"
    theirs.write_bytes(data)
    mine.write_bytes(data)
    real = qemu_img("check", *repair, str(theirs), check=False)
    assert bg("check", *repair, str(mine)) == (real.returncode, real.stdout, real.stderr)
    after = qemu_img("check", str(mine), check=False).returncode
    assert after == qemu_img("check", str(theirs), check=False).returncode
    if repair == ["-r", "all"]:
        assert after == 0


@pytest.mark.parametrize("opts", ["compat=0.10", "compression_type=zstd"])
@pytest.mark.parametrize("seed", range(6))
def test_random_l1_l2_damage(tmp_path: Path, opts: str, seed: int) -> None:
    """COPIED flags flipped, offsets moved (unaligned, past the end), reserved bits set in L1/L2 entries."""
    import random

    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(base), "8M")
    qemu_io(base, "write -P 1 0 300k", "write -P 3 3M 5k", "write -c -P 4 6M 64k")
    if "zstd" in opts:
        qemu_img("snapshot", "-c", "s", str(base))
        qemu_io(base, "write -P 5 0 64k")
    data = bytearray(base.read_bytes())
    rng = random.Random(seed)
    l1 = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1)[0] & 0x00FFFFFFFFFFFE00
    for _ in range(rng.randint(1, 2)):
        kind = rng.choice(["copied", "l1copied", "offset", "reserved"])
        pos = l1 if kind == "l1copied" else l2 + 8 * rng.randrange(100)
        entry = struct.unpack_from(">Q", data, pos)[0]
        if kind in ("copied", "l1copied"):
            entry ^= 1 << 63
        elif kind == "offset" and not entry & (1 << 62):
            entry = (entry & ~0x00FFFFFFFFFFFE00) | (rng.randrange(0, 2 * len(data)) & ~0x1FF)
        else:
            entry |= 2
        struct.pack_into(">Q", data, pos, entry)
    theirs, mine = tmp_path / "theirs.qcow2", tmp_path / "mine.qcow2"
    theirs.write_bytes(data)
    mine.write_bytes(data)
    same_as_qemu(str(mine))
    real = qemu_img("check", "-r", "all", str(theirs), check=False)
    assert bg("check", "-r", "all", str(mine))[0] == real.returncode
    assert qemu_img("check", str(mine), check=False).returncode == qemu_img("check", str(theirs),
                                                                             check=False).returncode


def test_repaired_leaks_are_discarded_like_qemu(image: Path, tmp_path: Path) -> None:
    """A leaked data cluster freed by ``check -r leaks`` is punched out of the file, as qemu-img does
    (QCOW2_DISCARD_ALWAYS): both files keep the same number of blocks."""
    import os
    import shutil

    off, entry = l2_entry0(image)
    with open(image, "r+b") as f:  # unlink the first 64 KiB of data: its cluster leaks
        f.seek(off)
        f.write(struct.pack(">Q", 0))
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copyfile(image, ours)  # both copies allocated alike
    shutil.copyfile(image, theirs)
    before = os.stat(ours).st_blocks
    real = qemu_img("check", "-r", "leaks", str(theirs), check=False)
    assert bg("check", "-r", "leaks", str(ours)) == (real.returncode, real.stdout, real.stderr)
    assert "1 leaked clusters" in real.stdout
    assert os.stat(ours).st_blocks == os.stat(theirs).st_blocks < before
    with open(ours, "rb") as f:
        f.seek(entry & 0x00FFFFFFFFFFFE00)
        assert f.read(CS) == bytes(CS)  # the old data is gone from the file
