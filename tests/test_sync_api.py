"""The synchronous facade's library API against the real qemu-img: extents() = ``qemu-img map --output=json``,
info() = ``qemu-img info --output=json``, as_file() = a seekable binary file, read_only = nothing written."""

from __future__ import annotations

import hashlib
import io
import json
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

import blockgraph
import pytest

pytestmark = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-io")),
                                reason="needs qemu-img and qemu-io")

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True).stdout


def qemu_io(fmt: str, name: str, *cmds: str) -> None:
    subprocess.run(["qemu-io", "-f", fmt, *[a for c in cmds for a in ("-c", c)], name], check=True,
                   capture_output=True)


def qemu_json(*args: str) -> Any:
    return json.loads(qemu_img(*args, "--output=json"))


def as_json(extents: Any) -> list[dict[str, Any]]:
    """Extent records as qemu-img prints them: no ``offset`` key where there is none."""
    return [{k: v for k, v in e._asdict().items() if not (k == "offset" and v is None)} for e in extents]


@pytest.fixture
def chain() -> Path:
    """base.raw <- top.qcow2: base data, overlay data, zero clusters over base data, discarded areas."""
    base = Path("base.raw")
    qemu_img("create", "-q", "-f", "raw", str(base), "8M")
    qemu_io("raw", str(base), "write -P 0x11 0 2M", "write -P 0x12 5M 512k")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-b", "base.raw", "-F", "raw", "top.qcow2")
    qemu_io("qcow2", "top.qcow2", "write -P 0x21 64k 128k", "write -z 1M 256k", "write -P 0x22 3M 1M",
            "discard 3M 512k", "write -P 0x23 7M 4k", "write -z -u 5M 64k")
    return Path("top.qcow2")


def test_extents_of_a_qcow2_chain_equal_qemu_img_map(chain: Path) -> None:
    want = qemu_json("map", str(chain))
    assert {(e["depth"], e["zero"], e["data"]) for e in want} >= {(0, False, True), (0, True, False),
                                                                  (1, False, True), (1, True, False)}
    with blockgraph.open(str(chain), read_only=True) as img:
        got = list(img.extents())
        assert as_json(got) == want
        assert as_json(img.extents(1536 << 10, 4 * MiB)) == qemu_json(
            "map", "--start-offset=1536k", "--max-length=4M", str(chain))
        assert list(img.extents(img.length)) == []  # qemu-img's empty entry past the end is left out
    first = got[0]
    assert (first.start, first.depth, first.present) == (0, 1, True) and first.offset == 0


@pytest.mark.parametrize(("fmt", "opts"), [("vmdk", []), ("vmdk", ["-o", "subformat=monolithicFlat"]),
                                           ("vpc", []), ("vpc", ["-o", "subformat=fixed"])])
def test_extents_of_vmdk_and_vpc_equal_qemu_img_map(fmt: str, opts: list[str]) -> None:
    name = f"t.{fmt}"
    qemu_img("create", "-q", "-f", fmt, *opts, name, "8M")
    qemu_io(fmt, name, "write -P 0x11 0 64k", "write -z 1M 64k", "write -P 0x22 2M 4k", "write -P 0 3M 64k")
    want = qemu_json("map", "-f", fmt, name)  # before the read-write open locks the image
    with blockgraph.open(name, fmt) as img:
        assert as_json(img.extents()) == want


def test_info_equals_qemu_img_info(chain: Path) -> None:
    qemu_img("snapshot", "-c", "snap1", str(chain))
    want, want_chain = qemu_json("info", str(chain)), qemu_json("info", "--backing-chain", str(chain))
    assert want["snapshots"][0]["name"] == "snap1" and want["backing-filename"] == "base.raw"
    with blockgraph.open(str(chain), read_only=True) as img:
        assert img.info() == want
        assert img.info(backing_chain=True) == want_chain
    with blockgraph.open(str(chain)) as img:  # read-write: the same answer
        assert img.info() == want


@pytest.mark.parametrize("fmt", ["vmdk", "raw"])
def test_info_of_vmdk_and_raw(fmt: str) -> None:
    name = f"i.{fmt}"
    qemu_img("create", "-q", "-f", fmt, name, "3M")
    qemu_io(fmt, name, "write -P 0x5 1M 64k")
    want = qemu_json("info", "-f", fmt, name)
    with blockgraph.open(name, fmt, read_only=True) as img:
        assert img.info() == want


def test_copyfileobj_streams_an_image_out_and_in(chain: Path) -> None:
    qemu_img("convert", "-O", "raw", str(chain), "want.raw")
    want = Path("want.raw").read_bytes()
    with blockgraph.open(str(chain), read_only=True) as img, open("got.raw", "wb") as out:
        f = img.as_file()
        assert (f.readable(), f.writable(), f.seekable(), f.mode) == (True, False, True, "rb")
        shutil.copyfileobj(f, out, 300_000)  # a size that does not divide the image: the last read is short
        assert f.tell() == len(want) and f.read(10) == b"" and f.read() == b""
    assert Path("got.raw").read_bytes() == want
    # ... and back in, into a fresh qcow2 of the same size.
    qemu_img("create", "-q", "-f", "qcow2", "copy.qcow2", str(len(want)))
    with blockgraph.open("copy.qcow2") as img, open("want.raw", "rb") as src:
        dst = img.as_file()
        shutil.copyfileobj(src, dst)
        assert dst.tell() == len(want)
        dst.close()
        assert dst.closed and img.read(0, 4) == b"\x11" * 4  # closing the file leaves the image open
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", "want.raw", "copy.qcow2"], check=True)


def test_buffered_reader_seek_and_readinto(chain: Path) -> None:
    qemu_img("convert", "-O", "raw", str(chain), "want.raw")
    want = Path("want.raw").read_bytes()
    with blockgraph.open(str(chain), read_only=True) as img:
        r = io.BufferedReader(img.as_file(), buffer_size=64 << 10)
        assert r.read(5) == want[:5]
        assert r.seek(3 * MiB - 7) == 3 * MiB - 7 and r.read(20) == want[3 * MiB - 7:3 * MiB + 13]
        assert r.seek(-100, io.SEEK_END) == len(want) - 100 and r.read() == want[-100:]
        assert r.read(1) == b""
        raw = img.as_file()  # independent cursor
        buf = bytearray(1000)
        raw.seek(MiB - 500)
        assert raw.readinto(buf) == 1000 and buf == want[MiB - 500:MiB + 500]
        raw.seek(len(want) - 10)
        assert raw.readinto(buf) == 10 and buf[:10] == want[-10:] and raw.readinto(buf) == 0
        raw.seek(len(want) + 4096)  # seeking past the end is allowed, as for files; reads give nothing
        assert raw.read(10) == b"" and raw.tell() == len(want) + 4096
        with pytest.raises(OSError, match="Invalid argument"):
            raw.seek(-1)


def test_read_only_file_refuses_writes(chain: Path) -> None:
    before = chain.read_bytes()
    with blockgraph.open(str(chain), read_only=True) as img:
        f = img.as_file()
        with pytest.raises(io.UnsupportedOperation):
            f.write(b"x")
        with pytest.raises(io.UnsupportedOperation):
            f.truncate(0)
        f.close()
        with pytest.raises(ValueError, match="closed file"):
            f.read(1)
    assert chain.read_bytes() == before


def test_writes_do_not_grow_the_image_but_truncate_does() -> None:
    qemu_img("create", "-q", "-f", "qcow2", "g.qcow2", "1M")
    with blockgraph.open("g.qcow2") as img:
        f = img.as_file()
        f.seek(MiB - 2)
        with pytest.raises(OSError, match="No space left"):
            f.write(b"abc")
        assert f.tell() == MiB - 2 and f.write(b"ab") == 2
        assert f.truncate(2 * MiB) == 2 * MiB and img.length == 2 * MiB and f.tell() == MiB
        assert f.write(b"cd") == 2
    assert qemu_json("info", "g.qcow2")["virtual-size"] == 2 * MiB
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P 0x61 {MiB - 2} 1", "-c",
                          f"read -P 0x64 {MiB + 1} 1", "g.qcow2"], capture_output=True, text=True, check=True)
    assert "Pattern verification failed" not in out.stdout


def _no_core() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def test_read_only_open_of_a_dirty_qcow2_writes_nothing() -> None:
    """Lazy refcounts and a writer that died: the dirty bit is set and refcounts are missing on disk."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "d.qcow2", "4M")
    p = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 512k", "-c", "write -P 0x33 1M 64k",
                        "-c", "abort", "d.qcow2"], capture_output=True, preexec_fn=_no_core, check=False)
    assert p.returncode != 0
    assert qemu_json("info", "d.qcow2")["dirty-flag"] is True
    digest = hashlib.sha256(Path("d.qcow2").read_bytes()).hexdigest()
    with blockgraph.open("d.qcow2", read_only=True) as img:
        assert img.read(0, 512 << 10) == b"\x5a" * (512 << 10)
        assert img.read(MiB, 65536) == b"\x33" * 65536 and img.read(2 * MiB, 4096) == bytes(4096)
        assert img.info()["dirty-flag"] is True
        with io.BufferedReader(img.as_file()) as f:
            assert f.read(4) == b"ZZZZ"
    assert hashlib.sha256(Path("d.qcow2").read_bytes()).hexdigest() == digest
