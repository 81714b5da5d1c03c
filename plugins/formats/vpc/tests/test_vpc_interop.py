"""vpc against real qemu-img/qemu-io, both ways: data, virtual sizes, probing, errors, conversion."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from blockgraph.testing.peers import random_writes
from blockgraph_vpc import format as fmt
from vpc_helpers import QEMU_IMG, QEMU_IO, bg, create, needs_qemu, qemu_raw, read_all, run, write_at

pytestmark = [pytest.mark.interop, needs_qemu]
MiB = 1 << 20
SUBFORMATS = [("dynamic", "off"), ("fixed", "off"), ("dynamic", "on"), ("fixed", "on")]


def qemu_io(path: Path, *cmds: str, fmt_name: str = "vpc") -> None:
    args = [QEMU_IO, "-f", fmt_name]
    for c in cmds:
        args += ["-c", c]
    run(*args, str(path))


def qemu_info(path: Path | str, fmt_name: str | None = "vpc") -> dict:
    return json.loads(run(QEMU_IMG, "info", "--output=json", *(["-f", fmt_name] if fmt_name else []),
                          str(path)).stdout)


def bg_info(path: Path | str, fmt_name: str | None = "vpc") -> dict:
    return json.loads(bg("img", "info", "--output=json", *(["-f", fmt_name] if fmt_name else []), str(path)).stdout)


@pytest.mark.parametrize(("subformat", "force"), SUBFORMATS)
def test_qemu_written_images_read_as_qemu_reads_them(tmp_path: Path, subformat: str, force: str) -> None:
    img = tmp_path / "q.vhd"
    run(QEMU_IMG, "create", "-q", "-f", "vpc", "-o", f"subformat={subformat},force_size={force}", str(img), "5M")
    qemu_io(img, "write -P 0x11 0 4k", "write -P 0x22 1536 1k", "write -P 0x33 2047k 3k",
            "write -P 0x44 4M 512", "write -z 100k 8k")
    ours = read_all(img)
    assert ours == qemu_raw(img, "vpc", tmp_path)
    assert ours[:1536] == b"\x11" * 1536 and ours[2047 * 1024:2050 * 1024] == b"\x33" * 3072
    out = tmp_path / "bg.raw"
    bg("img", "convert", "-f", "vpc", "-O", "raw", str(img), str(out))
    assert out.read_bytes() == ours


@pytest.mark.parametrize(("subformat", "force"), SUBFORMATS)
def test_our_images_pass_qemu(tmp_path: Path, subformat: str, force: str) -> None:
    """Random patterns written by us: qemu-img compare against a raw file written the same way."""
    img, ref = tmp_path / "b.vhd", tmp_path / "ref.raw"
    create(img, 5 * MiB, subformat=subformat, force_size=force)
    size = qemu_info(img)["virtual-size"]
    assert size == bg_info(img)["virtual-size"]
    writes, data = random_writes(size, f"{subformat}{force}")
    write_at(img, writes)
    ref.write_bytes(data)
    assert run(QEMU_IMG, "compare", "-f", "vpc", "-F", "raw", str(img), str(ref)).returncode == 0
    assert read_all(img) == data


# size -> (force_size) table: odd sizes, the CHS branch limits, the maximum geometry and the 2040 GiB limit.
ODD_SIZES = ["512", "1000", "35000", "1M", "10M", "100000000", "1G", "4100M",
             str((65535 * 16 * 63 - 1) * 512), str(65535 * 16 * 63 * 512), "127G", "128G", "2000G", "2040G"]


async def _create_and_measure(pairs: list[tuple[Path, Path, int]], force: bool) -> dict[int, tuple[int, int]]:
    """Our image for each size, and (our size of qemu's image, our size of ours), in one session."""
    from blockgraph.node import close_node
    from blockgraph.session import Session
    from blockgraph_vpc.driver import VpcCreateOptions, VpcDriver

    session = Session()
    out = {}
    try:
        for q, b, size in pairs:
            await VpcDriver.create(session, str(b), VpcCreateOptions(size=size, force_size=force))
            sizes = []
            for path in (q, b):
                node = await session.open_image(str(path), fmt="vpc", read_only=True)
                sizes.append(node.length)
                await close_node(node)
            out[size] = (sizes[0], sizes[1])
    finally:
        await session.close()
    return out


@pytest.mark.parametrize("force", ["off", "on"])
def test_virtual_sizes_match_qemu(tmp_path: Path, force: str) -> None:
    from blockgraph.options import parse_size
    from vpc_helpers import arun

    pairs = []
    for size in ODD_SIZES:
        q, b = tmp_path / f"q{size}.vhd", tmp_path / f"b{size}.vhd"
        run(QEMU_IMG, "create", "-q", "-f", "vpc", "-o", f"force_size={force}", str(q), size)
        pairs.append((q, b, parse_size(size)))
    ours = arun(_create_and_measure(pairs, force == "on"))
    for q, b, size in pairs:
        want = qemu_info(q)["virtual-size"]
        assert ours[size] == (want, want), size
        assert struct.unpack(">HBB", b.read_bytes()[56:60]) == struct.unpack(">HBB", q.read_bytes()[56:60])
    assert qemu_info(pairs[3][1])["virtual-size"] == ours[pairs[3][2]][1]
    assert bg_info(pairs[3][0])["virtual-size"] == ours[pairs[3][2]][0]


def test_too_large_refused_as_qemu(tmp_path: Path) -> None:
    q = run(QEMU_IMG, "create", "-q", "-f", "vpc", str(tmp_path / "q.vhd"), "2041G", ok=False)
    b = bg("img", "create", "-q", "-f", "vpc", str(tmp_path / "b.vhd"), "2041G", ok=False)
    assert q.returncode == b.returncode == 1
    assert b.stderr.replace("blockgraph", "qemu-img").replace("b.vhd", "q.vhd") == q.stderr


def _retag(path: Path, app: bytes, current_size: int, chs: tuple[int, int, int] | None = None) -> None:
    """Rewrite both footers with another creator app / current size / geometry (checksums fixed)."""
    data = bytearray(path.read_bytes())
    footer = fmt.Footer.parse(bytes(data[:512]))
    footer.creator_app, footer.current_size = app, current_size
    if chs:
        footer.cyls, footer.heads, footer.secs = chs
    raw = footer.pack()
    data[:512] = raw
    data[-512:] = raw
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("app", [b"vpc ", b"qemu", b"qem2", b"win ", b"d2v ", b"tap\0", b"CTXS", b"xyz "])
def test_creator_app_heuristics_match_qemu(tmp_path: Path, app: bytes) -> None:
    """Hyper-V/Azure style: current_size is not a geometry multiple; which one wins depends on the creator."""
    img = tmp_path / "h.vhd"
    run(QEMU_IMG, "create", "-q", "-f", "vpc", str(img), "10M")
    _retag(img, app, 10 * MiB - 3 * 512)
    assert bg_info(img)["virtual-size"] == qemu_info(img)["virtual-size"]
    for calc in ("chs", "current_size"):
        spec = f'json:{{"driver":"vpc","force_size_calc":"{calc}","file":{{"driver":"file","filename":"{img}"}}}}'
        assert bg_info(spec, None)["virtual-size"] == qemu_info(spec, None)["virtual-size"]


def test_max_geometry_uses_current_size(tmp_path: Path) -> None:
    """Even for a CHS creator app, the maximum geometry means "use current_size" (else the disk is cut)."""
    img = tmp_path / "m.vhd"
    run(QEMU_IMG, "create", "-q", "-f", "vpc", str(img), "200G")
    _retag(img, b"vpc ", (200 << 30) - 4096, (65535, 16, 255))
    assert bg_info(img)["virtual-size"] == qemu_info(img)["virtual-size"] == (200 << 30) - 4096


def test_probing_as_qemu(tmp_path: Path) -> None:
    """A dynamic VHD starts with its footer (vpc); a fixed one only ends with it, so both tools say raw."""
    for subformat in ("dynamic", "fixed"):
        img = tmp_path / f"{subformat}.vhd"
        create(img, MiB, subformat=subformat)
        assert bg_info(img, None)["format"] == qemu_info(img, None)["format"]
    assert bg_info(tmp_path / "dynamic.vhd", None)["format"] == "vpc"
    assert bg_info(tmp_path / "dynamic.vhd", "vhd")["format"] == "vpc"  # the alias


def _corrupt(path: Path, at: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[at:at + len(value)] = value
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("at", "value"), [(100, b"\x01"), (512, b"x"), (512 + 32, b"\x00\x00\x03\x00"),
                                         (512 + 28, b"\x00\x00\x03\x00")])
def test_open_errors_match_qemu(tmp_path: Path, at: int, value: bytes) -> None:
    """Wrong footer checksum, header magic, block size, a BAT past the end: refused with QEMU's text."""
    img = tmp_path / "c.vhd"
    run(QEMU_IMG, "create", "-q", "-f", "vpc", str(img), "4M")
    _corrupt(img, at, value)
    q = run(QEMU_IMG, "info", "-f", "vpc", str(img), ok=False)
    b = bg("img", "info", "-f", "vpc", str(img), ok=False)
    assert q.returncode == b.returncode == 1
    assert b.stderr.replace("blockgraph", "qemu-img") == q.stderr


def test_dynamic_header_checksum_not_fatal_as_in_qemu(tmp_path: Path) -> None:
    img = tmp_path / "c.vhd"
    run(QEMU_IMG, "create", "-q", "-f", "vpc", str(img), "4M")
    _corrupt(img, 512 + 600, b"\x01")  # inside the parent name, covered by the header's checksum
    assert bg_info(img)["virtual-size"] == qemu_info(img)["virtual-size"]


@pytest.mark.parametrize(("src_fmt", "dst_fmt"), [("vpc", "raw"), ("raw", "vpc"), ("vpc", "vdi"), ("vdi", "vpc"),
                                                  ("vpc", "vpc")])
def test_convert(tmp_path: Path, src_fmt: str, dst_fmt: str) -> None:
    src, dst = tmp_path / f"src.{src_fmt}", tmp_path / f"dst.{dst_fmt}"
    size = "4200K" if src_fmt != "vpc" else "4M"
    run(QEMU_IMG, "create", "-q", "-f", src_fmt, str(src), size)
    qemu_io(src, "write -P 0x61 0 64k", "write -P 0x62 3M 4k", fmt_name=src_fmt)
    bg("img", "convert", "-f", src_fmt, "-O", dst_fmt, str(src), str(dst))
    assert run(QEMU_IMG, "compare", "-f", src_fmt, "-F", dst_fmt, str(src), str(dst)).returncode == 0
    assert qemu_info(dst, None)["format"] == dst_fmt


@pytest.mark.parametrize("args", [["y.vhd", "10M"], ["-o", "subformat=foo", "y.vhd", "1M"],
                                  ["-o", "subformat=fixed,force_size=on", "y.vhd", "1M"], ["-o", "help"]])
def test_create_output_as_qemu(tmp_path: Path, args: list[str]) -> None:
    args = [str(tmp_path / a) if a.endswith(".vhd") else a for a in args]
    q = run(QEMU_IMG, "create", "-f", "vpc", *args, ok=False)
    b = bg("img", "create", "-f", "vpc", *args, ok=False)
    assert (b.returncode, b.stdout, b.stderr.replace("blockgraph", "qemu-img")) == (q.returncode, q.stdout, q.stderr)


@pytest.mark.parametrize(("subformat", "force"), SUBFORMATS)
def test_info_and_map_as_qemu(tmp_path: Path, subformat: str, force: str) -> None:
    img = tmp_path / "m.vhd"
    run(QEMU_IMG, "create", "-q", "-f", "vpc", "-o", f"subformat={subformat},force_size={force}", str(img), "5M")
    if subformat == "fixed":
        qemu_io(img, "write -P 0x11 0 4k", "write -P 0x44 4M 512")
    else:
        # Whole blocks: QEMU reports an allocated block as data without asking the file where it has holes,
        # while blockgraph's core always asks (a known difference of the generic layer, not of vpc).
        end = qemu_info(img)["virtual-size"]
        qemu_io(img, "write -P 0x11 0 2M", f"write -P 0x44 4M {end - 4 * MiB}")
    for args in (["info"], ["info", "--output=json"], ["map", "--output=json"], ["map"]):
        q = run(QEMU_IMG, *args, "-f", "vpc", str(img))
        b = bg("img", *args, "-f", "vpc", str(img))
        assert b.stdout == q.stdout, args


def test_no_check_as_qemu(tmp_path: Path) -> None:
    img = tmp_path / "c.vhd"
    create(img, MiB)
    q = run(QEMU_IMG, "check", "-f", "vpc", str(img), ok=False)
    b = bg("img", "check", "-f", "vpc", str(img), ok=False)
    assert (b.returncode, b.stderr) == (q.returncode, q.stderr) == (63, q.stderr)
