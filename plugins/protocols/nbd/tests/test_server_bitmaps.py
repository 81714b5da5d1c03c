"""``qemu:dirty-bitmap:NAME`` served by ``blockgraph nbd -B`` and by qemu-nbd on copies of the same qcow2:
the same maps through nbdinfo and qemu-img map (x-dirty-bitmap), the same refusals, and writes through the
export marking exactly the written granules."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                 reason="qemu-img/qemu-io/qemu-nbd (qemu-utils) or nbdinfo (libnbd-bin) missing")]
BLOCKGRAPH = [sys.executable, "-m", "blockgraph.cli.main", "nbd"]
MiB = 1 << 20
WRITES = ["write -P 1 0 1", "write -P 2 1M 100k", "write -z 5M 64k", "write -P 3 9M 512"]


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 MiB qcow2 with b0 (64 KiB), b1 (4 KiB) dirtied by qemu-io, and b2 disabled (clean)."""
    path = tmp_path_factory.mktemp("bm") / "img.qcow2"
    assert run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "10M").returncode == 0
    for args in (["b0"], ["-g", "4096", "b1"], ["--disable", "b2"]):
        assert run("qemu-img", "bitmap", "--add", str(path), *args[-1:], *args[:-1]).returncode == 0
    cmd = ["qemu-io"]
    for w in WRITES:
        cmd += ["-c", w]
    assert run(*cmd, str(path)).returncode == 0
    return path


class Server:
    def __init__(self, program: list[str], sock: Path, args: list[str]) -> None:
        self.sock = sock
        self.proc = subprocess.Popen([*program, "-k", str(sock), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"{program[0]} exited: {self.proc.stderr.read()}")
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


@pytest.fixture
def pair(tmp_path: Path, image: Path) -> Iterator[callable]:
    servers: list[Server] = []

    def start(*args: str) -> tuple[Server, Server]:
        out = []
        for program, tag in ((["qemu-nbd"], "q"), (BLOCKGRAPH, "b")):
            copy = tmp_path / f"{tag}{len(servers)}.qcow2"
            shutil.copyfile(image, copy)
            srv = Server(program, tmp_path / f"{tag}{len(servers)}.sock", ["-t", *args, str(copy)])
            servers.append(srv)
            out.append(srv)
        return out[0], out[1]

    yield start
    for s in servers:
        s.stop()


def nbdinfo_map(uri: str, name: str) -> str:
    res = run("nbdinfo", f"--map=qemu:dirty-bitmap:{name}", uri)
    assert res.returncode == 0, res.stderr
    return res.stdout


def qemu_img_map(sock: Path, name: str) -> str:
    res = run("qemu-img", "map", "--output=json", "--image-opts",
              f"driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap=qemu:dirty-bitmap:{name}")
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("readonly", [True, False], ids=["ro", "rw"])
def test_maps_equal_qemu_nbd(pair: callable, readonly: bool) -> None:
    flags = ["-r"] if readonly else []
    q, b = pair(*flags, "-B", "b0", "-B", "b1", "-B", "b2")
    for name in ("b0", "b1", "b2"):
        theirs = nbdinfo_map(q.uri, name)
        assert nbdinfo_map(b.uri, name) == theirs
        assert qemu_img_map(b.sock, name) == qemu_img_map(q.sock, name)
    # Something could differ: b1 has 4 KiB granules, so the 1-byte write is one dirty 4 KiB extent.
    assert nbdinfo_map(b.uri, "b1").split("\n")[0].split() == ["0", "4096", "1", "dirty"]


def test_list_offers_the_bitmap_contexts(pair: callable) -> None:
    q, b = pair("-r", "-B", "b1")
    lines = [ln.strip() for ln in run("nbdinfo", "--list", b.uri).stdout.splitlines()]
    assert "qemu:dirty-bitmap:b1" in lines
    theirs = [ln.strip() for ln in run("nbdinfo", "--list", q.uri).stdout.splitlines()]
    assert [ln for ln in lines if ln.startswith(("base:", "qemu:"))] == \
        [ln for ln in theirs if ln.startswith(("base:", "qemu:"))]


def test_writes_through_the_export_mark_the_written_granules(pair: callable) -> None:
    q, b = pair("-f", "qcow2", "-B", "b1")
    for srv in (q, b):
        for w in ("write -P 5 3M 1", "write -P 6 7M 10000", "write -z 8M 8192"):
            res = run("qemu-io", "-f", "raw", "-c", w, srv.uri)
            assert res.returncode == 0, res.stderr
    ours = nbdinfo_map(b.uri, "b1")
    assert ours == nbdinfo_map(q.uri, "b1")
    dirty = {int(ln.split()[0]): int(ln.split()[1]) for ln in ours.splitlines() if ln.split()[-1] == "dirty"}
    assert dirty[3 * MiB] == 4096 and dirty[7 * MiB] == 12288 and dirty[8 * MiB] == 8192


def _stderr_tail(program: list[str], sock: Path, args: list[str]) -> tuple[int, str]:
    res = subprocess.run([*program, "-k", str(sock), *args], capture_output=True, text=True, timeout=60)
    return res.returncode, res.stderr.splitlines()[-1] if res.stderr else ""


def test_missing_and_inconsistent_bitmaps_refused_as_qemu_nbd(tmp_path: Path, image: Path) -> None:
    # A writer killed while the image is open leaves its bitmaps in use: inconsistent for every later user.
    inuse = tmp_path / "inuse.qcow2"
    shutil.copyfile(image, inuse)
    killed = Server(["qemu-nbd"], tmp_path / "k.sock", [str(inuse)])
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(30)
    for args in (["-r", "-B", "zz"], ["-r", "-B", "b0"]):
        copies = []
        for tag in ("q", "b"):
            copies.append(tmp_path / f"{tag}-{args[-1]}.qcow2")
            shutil.copyfile(inuse, copies[-1])
        theirs = _stderr_tail(["qemu-nbd"], tmp_path / "x.sock", [*args, str(copies[0])])
        ours = _stderr_tail(BLOCKGRAPH, tmp_path / "y.sock", [*args, str(copies[1])])
        assert theirs[0] == 1 and ours == theirs
    assert ours[1] == "qemu-nbd: Bitmap 'b0' is inconsistent and cannot be used"
