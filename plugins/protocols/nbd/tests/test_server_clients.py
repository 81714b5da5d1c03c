"""The NBD server against clients nobody here wrote: nbdinfo, nbdcopy, qemu-img and qemu-io."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from blockgraph_nbd.server_testing import ServerThread

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 8 * MiB
EXTENTS = ((MiB, MiB, 0xAB), (5 * MiB, 64 * 1024, 0xCD))


def need(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} is not installed")


def sparse_image(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n, byte in EXTENTS:
            f.seek(off)
            f.write(bytes([byte]) * n)
    return path


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return sparse_image(tmp_path / "disk.raw")


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path / "srv.sock") as s:
        yield s


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[callable]:
    procs: list[subprocess.Popen] = []

    def start(image: Path, *args: str) -> str:
        sock = tmp_path / f"qemu{len(procs)}.sock"
        procs.append(subprocess.Popen(["qemu-nbd", "-t", "-k", str(sock), *args, str(image)]))
        for _ in range(200):
            if sock.exists():
                return f"nbd+unix:///?socket={sock}"
            time.sleep(0.02)
        raise AssertionError("qemu-nbd did not start")

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


@pytest.fixture
def serve_cli(tmp_path: Path) -> Iterator[callable]:
    """``blockgraph nbd ARGS -k SOCK`` in a subprocess; returns the export's URI once it listens."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> str:
        sock = tmp_path / f"bg{len(procs)}.sock"
        procs.append(subprocess.Popen([sys.executable, "-m", "blockgraph.cli.main", "nbd", "-k", str(sock),
                                       *args]))
        for _ in range(1500):
            if sock.exists():
                return f"nbd+unix:///?socket={sock}"
            time.sleep(0.02)
        raise AssertionError("blockgraph nbd did not start")

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


@need("nbdinfo")
def test_nbdinfo_shows_size_flags_block_sizes_and_contexts(srv: ServerThread, image: Path) -> None:
    srv.export(image, name="disk", description="a test disk", writable=True, allocation_depth=True)
    out = run("nbdinfo", srv.uri("disk"))
    assert "export-size: 8388608 (8M)" in out
    assert "description: a test disk" in out
    for line in ("is_read_only: false", "can_flush: true", "can_fua: true", "can_trim: true", "can_zero: true",
                 "can_fast_zero: true", "can_df: true", "can_cache: true", "can_multi_conn: true",
                 "block_size_minimum: 1", "block_size_preferred: 4096", "block_size_maximum: 33554432",
                 "base:allocation", "qemu:allocation-depth"):
        assert line in out, line


@need("nbdinfo")
def test_nbdinfo_json_of_a_read_only_export(srv: ServerThread, image: Path) -> None:
    srv.export(image, name="ro")
    info = json.loads(run("nbdinfo", "--json", srv.uri("ro")))
    assert info["structured"] is True
    exp = info["exports"][0]
    assert exp["export-name"] == "ro"
    assert exp["export-size"] == SIZE
    assert exp["is_read_only"] is True
    assert exp["can_trim"] is False and exp["can_zero"] is False
    assert exp["contexts"] == ["base:allocation"]


@need("nbdinfo")
def test_nbdinfo_list_names_every_export(srv: ServerThread, image: Path, tmp_path: Path) -> None:
    srv.export(image, name="one", description="first")
    two = tmp_path / "two.raw"
    two.write_bytes(bytes(2 * MiB))
    srv.export(two, name="two")
    info = json.loads(run("nbdinfo", "--list", "--json", srv.uri()))
    by_name = {e["export-name"]: e for e in info["exports"]}
    assert set(by_name) == {"one", "two"}
    assert by_name["one"]["description"] == "first"
    assert by_name["two"]["export-size"] == 2 * MiB


@need("nbdinfo")
@need("qemu-nbd")
def test_nbdinfo_map_matches_qemu_nbd(srv: ServerThread, image: Path, qemu_nbd: callable) -> None:
    srv.export(image)
    ours = run("nbdinfo", "--map", srv.uri())
    theirs = run("nbdinfo", "--map", qemu_nbd(image, "-r", "-f", "raw"))
    assert ours == theirs
    assert "1048576     1048576    0  data" in ours


@need("nbdinfo")
def test_nbdinfo_map_of_allocation_depth(srv: ServerThread, image: Path) -> None:
    srv.export(image, allocation_depth=True)
    out = run("nbdinfo", "--map=qemu:allocation-depth", srv.uri())
    assert out.split() == ["0", str(SIZE), "1", "local"]


@need("nbdcopy")
def test_nbdcopy_out_of_the_server(srv: ServerThread, image: Path, tmp_path: Path) -> None:
    srv.export(image)
    out = tmp_path / "copy.raw"
    run("nbdcopy", srv.uri(), str(out))
    assert out.read_bytes() == image.read_bytes()


@need("nbdcopy")
def test_nbdcopy_into_the_server(srv: ServerThread, tmp_path: Path) -> None:
    target = tmp_path / "target.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    srv.export(target, writable=True)
    source = tmp_path / "source.raw"
    source.write_bytes(bytes(range(256)) * (SIZE // 256))
    run("nbdcopy", str(source), srv.uri())
    assert target.read_bytes() == source.read_bytes()


@need("qemu-img")
def test_qemu_img_convert_and_compare(srv: ServerThread, image: Path, tmp_path: Path) -> None:
    srv.export(image)
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri(), str(out))
    assert out.read_bytes() == image.read_bytes()
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri(), str(image)).strip() \
        == "Images are identical."


@need("qemu-img")
@need("qemu-nbd")
def test_qemu_img_map_matches_qemu_nbd(srv: ServerThread, image: Path, qemu_nbd: callable) -> None:
    srv.export(image)
    ours = json.loads(run("qemu-img", "map", "-f", "raw", "--output=json", srv.uri()))
    theirs = json.loads(run("qemu-img", "map", "-f", "raw", "--output=json", qemu_nbd(image, "-r", "-f", "raw")))
    assert ours == theirs
    assert any(e["start"] == MiB and e["data"] for e in ours)


@need("qemu-io")
def test_qemu_io_reads_writes_zeroes_and_discards(srv: ServerThread, image: Path) -> None:
    srv.export(image, writable=True, discard="unmap")
    out = run("qemu-io", "-f", "raw", "-c", "read -P 0xab 1M 1M", "-c", "write -P 0x5a 3M 128k",
              "-c", "write -z 1M 64k", "-c", "write -z -u 5M 64k", "-c", "discard 6M 1M", "-c", "flush",
              "-c", "read -P 0x5a 3M 128k", "-c", "read -P 0 1M 64k", srv.uri())
    assert "Pattern verification failed" not in out
    assert out.count("read ") == 3
    data = image.read_bytes()
    assert data[3 * MiB:3 * MiB + 128 * 1024] == b"\x5a" * 128 * 1024
    assert data[MiB:MiB + 64 * 1024] == bytes(64 * 1024)
    assert data[5 * MiB:5 * MiB + 64 * 1024] == bytes(64 * 1024)
    assert data[MiB + 64 * 1024:2 * MiB] == b"\xab" * (MiB - 64 * 1024)


@need("qemu-io")
def test_qemu_io_on_a_read_only_export(srv: ServerThread, image: Path) -> None:
    srv.export(image)
    out = run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0xcd 5M 64k", srv.uri())
    assert "read 65536/65536 bytes at offset 5242880" in out
    res = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", srv.uri()], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0 and "Permission denied" in res.stderr  # qemu's client refuses RW on RO exports
    assert image.read_bytes()[:4096] == bytes(4096)


@need("qemu-io")
@need("nbdinfo")
def test_tcp_on_loopback_with_nbd_urls(image: Path) -> None:
    with ServerThread() as tcp:  # TCP, 127.0.0.1, a free port
        tcp.export(image, name="disk", writable=True)
        host, port = tcp.server.addresses()[0][:2]
        assert host == "127.0.0.1"
        assert "export-size: 8388608" in run("nbdinfo", f"nbd://127.0.0.1:{port}/disk")
        out = run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4k", "-c", "read -P 0xcd 5M 4k",
                  f"nbd:127.0.0.1:{port}:exportname=disk")
        assert "Pattern verification failed" not in out and "wrote 4096/4096" in out
    assert image.read_bytes()[:4096] == b"\x77" * 4096


@need("nbdinfo")
@need("qemu-nbd")
@need("qemu-img")
@need("qemu-io")
def test_allocation_depth_of_a_qcow2_chain_matches_qemu_nbd(tmp_path: Path, serve_cli: callable,
                                                            qemu_nbd: callable) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(base), "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", str(base))
    run("qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 2 512k 1M", "-c", "write -z 3M 512k", str(top))
    ours = serve_cli("-t", "-r", "-A", "-f", "qcow2", str(top))
    theirs = qemu_nbd(top, "-r", "-A", "-f", "qcow2")
    for ctx in ("--map=qemu:allocation-depth", "--map=base:allocation"):
        assert run("nbdinfo", ctx, ours) == run("nbdinfo", ctx, theirs)
    assert "2  backing depth 2" in run("nbdinfo", "--map=qemu:allocation-depth", ours)
    assert json.loads(run("qemu-img", "map", "-f", "raw", "--output=json", ours)) == \
        json.loads(run("qemu-img", "map", "-f", "raw", "--output=json", theirs))
