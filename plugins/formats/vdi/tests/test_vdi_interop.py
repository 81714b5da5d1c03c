"""vdi against real qemu-img/qemu-io, both ways: data, info, probing, header errors, check, conversion."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from blockgraph.driver import CheckFix
from blockgraph.testing.peers import random_writes
from blockgraph_vdi import header as hdr
from vdi_helpers import QEMU_IMG, QEMU_IO, bg, create, needs_qemu, qemu_raw, read_all, run, with_image, write_at

pytestmark = [pytest.mark.interop, needs_qemu]
MiB = 1 << 20


def qemu_io(path: Path, *cmds: str, fmt_name: str = "vdi") -> None:
    args = [QEMU_IO, "-f", fmt_name]
    for c in cmds:
        args += ["-c", c]
    run(*args, str(path))


def both(*args: str, path: Path) -> tuple:
    """The same img subcommand from qemu-img and from us: (qemu, ours), ours with qemu's program name."""
    q = run(QEMU_IMG, *args, str(path), ok=False)
    b = bg("img", *args, str(path), ok=False)
    return q, b


def same_output(q: object, b: object) -> None:
    assert b.returncode == q.returncode
    assert b.stdout == q.stdout
    assert b.stderr.replace("blockgraph", "qemu-img") == q.stderr


def patch(path: Path, at: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[at:at + len(value)] = value
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("static", ["off", "on"])
def test_qemu_written_images_read_as_qemu_reads_them(tmp_path: Path, static: str) -> None:
    img = tmp_path / "q.vdi"
    run(QEMU_IMG, "create", "-q", "-f", "vdi", "-o", f"static={static}", str(img), "5000k")
    qemu_io(img, "write -P 0x11 0 4k", "write -P 0x22 1536 1k", "write -P 0x33 1023k 3k",
            "write -P 0x44 4M 512", "write -z 100k 8k")
    ours = read_all(img)
    assert ours == qemu_raw(img, "vdi", tmp_path)
    assert ours[1023 * 1024:1026 * 1024] == b"\x33" * 3072
    out = tmp_path / "bg.raw"
    bg("img", "convert", "-f", "vdi", "-O", "raw", str(img), str(out))
    assert out.read_bytes() == ours


@pytest.mark.parametrize("static", ["off", "on"])
def test_our_images_pass_qemu_check_and_compare(tmp_path: Path, static: str) -> None:
    img, ref = tmp_path / "b.vdi", tmp_path / "ref.raw"
    size = 5 * MiB + 3 * 512
    create(img, size, static=static)
    assert run(QEMU_IMG, "check", str(img)).stdout == "No errors were found on the image.\n"
    writes, data = random_writes(size, static)
    write_at(img, writes)
    ref.write_bytes(data)
    assert run(QEMU_IMG, "check", str(img)).stdout == "No errors were found on the image.\n"
    assert run(QEMU_IMG, "compare", "-f", "vdi", "-F", "raw", str(img), str(ref)).returncode == 0
    q, b = both("check", "--output=json", path=img)
    same_output(q, b)


@pytest.mark.parametrize("static", ["off", "on"])
def test_info_and_probing_as_qemu(tmp_path: Path, static: str) -> None:
    img = tmp_path / "i.vdi"
    create(img, "7M", static=static)
    qemu_io(img, "write -P 1 2M 1M")
    for args in (("info",), ("info", "--output=json"), ("info", "-f", "vdi")):
        same_output(*both(*args, path=img))
    q, b = both("map", "--output=json", "-f", "vdi", path=img)
    same_output(q, b)


def test_create_layout_matches_qemu(tmp_path: Path) -> None:
    """Everything but the UUIDs is byte-identical to qemu-img's image."""
    for static in ("off", "on"):
        q, b = tmp_path / f"q{static}.vdi", tmp_path / f"b{static}.vdi"
        run(QEMU_IMG, "create", "-q", "-f", "vdi", "-o", f"static={static}", str(q), "3000k")
        create(b, "3000k", static=static)
        qd, bd = bytearray(q.read_bytes()), bytearray(b.read_bytes())
        qd[392:424] = bd[392:424] = bytes(32)  # uuid_image, uuid_last_snap
        assert qd == bd


HEADER_CASES = {
    "version": (68, struct.pack("<I", 0x00010002)),
    "block size": (376, struct.pack("<I", 2 * MiB)),
    "sector size": (360, struct.pack("<I", 4096)),
    "link uuid": (424, b"\x01"),
    "parent uuid": (440, b"\x01"),
    "bitmap room": (384, struct.pack("<I", 5)),
    "unaligned bmap": (340, struct.pack("<I", 0x201)),
    "unaligned data": (344, struct.pack("<I", 0x401)),
    "too large": (368, struct.pack("<Q", 1 << 60)),
    "signature": (64, struct.pack("<I", 0x12345678)),
    "too many blocks": (384, struct.pack("<I", 0x3FFFFFF0)),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_header_errors_match_qemu(tmp_path: Path, case: str) -> None:
    img = tmp_path / "h.vdi"
    run(QEMU_IMG, "create", "-q", "-f", "vdi", str(img), "10M")
    patch(img, *HEADER_CASES[case])
    q, b = both("info", "-f", "vdi", path=img)
    assert q.returncode == 1
    same_output(q, b)


def test_create_too_large_as_qemu(tmp_path: Path) -> None:
    for size in (str(0x1FFFFF8000000 + 1), "40P"):
        q = run(QEMU_IMG, "create", "-q", "-f", "vdi", str(tmp_path / "q.vdi"), size, ok=False)
        b = bg("img", "create", "-q", "-f", "vdi", str(tmp_path / "q.vdi"), size, ok=False)
        same_output(q, b)


def test_odd_disk_size_rounded_up_as_qemu(tmp_path: Path) -> None:
    img = tmp_path / "odd.vdi"
    run(QEMU_IMG, "create", "-q", "-f", "vdi", str(img), "10M")
    patch(img, 368, struct.pack("<Q", 10 * MiB - 100))
    same_output(*both("info", "--output=json", path=img))


CHECK_CASES = {
    "duplicate": [(516, struct.pack("<I", 0))],
    "too large": [(516, struct.pack("<I", 9)), (520, struct.pack("<I", 68))],
    "count": [(388, struct.pack("<I", 7))],
    "clean": [],
}


@pytest.mark.parametrize("case", sorted(CHECK_CASES))
def test_check_matches_qemu(tmp_path: Path, case: str) -> None:
    img = tmp_path / "c.vdi"
    run(QEMU_IMG, "create", "-q", "-f", "vdi", str(img), "10M")
    qemu_io(img, "write -P 0x11 0 4k", "write -P 0x22 3M 4k")
    for at, value in CHECK_CASES[case]:
        patch(img, at, value)
    variants = [("check",), ("check", "--output=json")] + ([("check", "-r", "all")] if case == "duplicate" else [])
    for args in variants:
        same_output(*both(*args, path=img))

    async def hook(blk: object, node: object) -> None:
        res = node.driver.check(CheckFix.NONE)
        assert res.corruptions == {"duplicate": 2, "too large": 2, "count": 1, "clean": 0}[case]
        assert all(m.startswith("ERROR: ") for m in res.messages) and len(res.messages) == res.corruptions

    with_image(img, hook, read_only=True)


def test_unallocated_and_discarded_blocks_read_as_zeros(tmp_path: Path) -> None:
    """VDI_DISCARDED (a zero block) and UNALLOCATED both store nothing and read as zeros, as in QEMU."""
    img = tmp_path / "z.vdi"
    run(QEMU_IMG, "create", "-q", "-f", "vdi", str(img), "4M")
    qemu_io(img, "write -P 0x55 0 2M")
    patch(img, 512 + 4, struct.pack("<I", hdr.DISCARDED))  # block 1 (data block 1) becomes a zero block
    patch(img, 388, struct.pack("<I", 1))
    ours = read_all(img)
    assert ours == qemu_raw(img, "vdi", tmp_path)
    assert ours[:MiB] == b"\x55" * MiB and ours[MiB:] == bytes(3 * MiB)
    rows = json.loads(bg("img", "map", "--output=json", "-f", "vdi", str(img)).stdout)
    assert rows[0]["data"] and not rows[1]["data"] and rows[1]["zero"] and rows[1]["length"] == 3 * MiB


@pytest.mark.parametrize(("src_fmt", "dst_fmt"), [("vdi", "raw"), ("raw", "vdi"), ("vdi", "vdi")])
def test_convert(tmp_path: Path, src_fmt: str, dst_fmt: str) -> None:
    src, dst = tmp_path / f"src.{src_fmt}", tmp_path / f"dst.{dst_fmt}"
    run(QEMU_IMG, "create", "-q", "-f", src_fmt, str(src), "4200K")
    qemu_io(src, "write -P 0x61 0 64k", "write -P 0x62 3M 4k", fmt_name=src_fmt)
    bg("img", "convert", "-f", src_fmt, "-O", dst_fmt, str(src), str(dst))
    assert run(QEMU_IMG, "compare", "-f", src_fmt, "-F", dst_fmt, str(src), str(dst)).returncode == 0
    if dst_fmt == "vdi":
        assert run(QEMU_IMG, "check", str(dst)).returncode == 0
        assert dst.stat().st_size < 3 * MiB  # only the written blocks are allocated


@pytest.mark.parametrize("args", [["y.vdi", "10M"], ["-o", "static=on", "y.vdi", "1M"], ["-o", "help"]])
def test_create_output_as_qemu(tmp_path: Path, args: list[str]) -> None:
    args = [str(tmp_path / a) if a.endswith(".vdi") else a for a in args]
    q = run(QEMU_IMG, "create", "-f", "vdi", *args, ok=False)
    b = bg("img", "create", "-f", "vdi", *args, ok=False)
    same_output(q, b)


def test_virtualbox_style_layout(tmp_path: Path) -> None:
    """VirtualBox's own layout (header size 0x190, data area aligned to 1 MiB, its text, blocks out of
    order in the data area) reads as qemu-img reads it, and our writes keep qemu-img check clean."""
    img = tmp_path / "vbox.vdi"
    h = hdr.Header(text=b"<<< Oracle VM VirtualBox Disk Image >>>\n", header_size=0x190, image_type=hdr.TYPE_DYNAMIC,
                   offset_bmap=0x200, offset_data=MiB, disk_size=4 * MiB, blocks_in_image=4, blocks_allocated=2,
                   uuid_image=b"\x01" * 16, uuid_last_snap=b"\x02" * 16)
    bmap = struct.pack("<4I", 1, hdr.UNALLOCATED, 0, hdr.DISCARDED)
    data = bytearray(MiB + 2 * MiB)
    data[:512] = h.pack()
    data[0x200:0x210] = bmap
    data[MiB:2 * MiB] = b"\xbb" * MiB  # data block 0 holds disk block 2
    data[2 * MiB:3 * MiB] = b"\xaa" * MiB  # data block 1 holds disk block 0
    img.write_bytes(bytes(data))
    ours = read_all(img)
    assert ours == qemu_raw(img, "vdi", tmp_path)
    assert ours == b"\xaa" * MiB + bytes(MiB) + b"\xbb" * MiB + bytes(MiB)
    write_at(img, [(MiB + 4096, b"\xcc" * 512), (3 * MiB, b"\xdd" * 512)])
    assert run(QEMU_IMG, "check", str(img)).returncode == 0
    assert read_all(img) == qemu_raw(img, "vdi", tmp_path)
