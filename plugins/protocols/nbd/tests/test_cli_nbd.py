"""``blockgraph nbd``: qemu-nbd's options, exit behaviour and error texts, checked with real clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop
BLOCKGRAPH = [sys.executable, "-m", "blockgraph.cli.main"]
MiB = 1 << 20


def need(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} is not installed")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(range(256)) * (4 * MiB // 256))
    return path


def bg_nbd(*args: str, pre: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*BLOCKGRAPH, *pre, "nbd", *args], capture_output=True, text=True, timeout=60)


class Served:
    """``blockgraph nbd ... -k SOCK`` in the background, ready once the socket exists."""

    def __init__(self, sock: Path, args: list[str], pre: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.sock = sock
        self.proc = subprocess.Popen([*BLOCKGRAPH, *pre, "nbd", "-k", str(sock), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"blockgraph nbd exited: {self.proc.stderr.read()}")
            assert time.monotonic() < deadline, "blockgraph nbd did not start"
            time.sleep(0.02)

    def uri(self, name: str = "") -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    def wait(self) -> int:
        return self.proc.wait(30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[callable]:
    started: list[Served] = []

    def start(*args: str, pre: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Served:
        started.append(Served(tmp_path / f"s{len(started)}.sock", list(args), pre, env))
        return started[-1]

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


def nbdinfo(*args: str) -> str:
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, check=True, timeout=60).stdout


# ---------------------------------------------------------------- errors, as qemu-nbd prints them

ERROR_CASES = [
    [],
    ["--foo", "x.raw"],
    ["--detect-zeroes=xyz", "x.raw"],
    ["--detect-zeroes=unmap", "x.raw"],
    ["-e", "-1", "x.raw"],
    ["-k", "relative.sock", "x.raw"],
    ["--cache=bad", "x.raw"],
    ["-n", "--cache=none", "x.raw"],
    ["--aio=bad", "x.raw"],
    ["--discard=bad", "x.raw"],
    ["-o", "x", "x.raw"],
    ["--image-opts", "-f", "raw", "driver=raw"],
    ["-f", "raw", "missing.raw"],
    ["-f", "raw", "-l", "snap1", "IMAGE"],
]


@need("qemu-nbd")
@pytest.mark.parametrize("args", ERROR_CASES, ids=lambda a: " ".join(a) or "no-args")
def test_errors_match_qemu_nbd(args: list[str], image: Path, tmp_path: Path) -> None:
    args = [str(image) if a == "IMAGE" else a for a in args]
    if "IMAGE" not in " ".join(args):  # anything that gets as far as listening stays on a private socket
        args = ["-k", str(tmp_path / "e.sock"), *args] if "-k" not in args else args
    ours = bg_nbd(*args)
    theirs = subprocess.run(["qemu-nbd", *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr == theirs.stderr


def test_missing_bitmap_is_refused_with_qemu_nbd_text(image: Path, tmp_path: Path) -> None:
    res = bg_nbd("-k", str(tmp_path / "b.sock"), "-f", "raw", "-B", "bm", str(image))
    assert res.returncode == 1
    assert res.stderr == "qemu-nbd: Bitmap 'bm' is not found\n"


def test_busy_port(image: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        res = bg_nbd("-b", "127.0.0.1", "-p", str(taken.getsockname()[1]), "-f", "raw", str(image))
    assert res.returncode == 1
    assert res.stderr == "qemu-nbd: Failed to find an available port: Address already in use\n"


def test_snapshot_without_qcow2_says_which_plugin(image: Path, tmp_path: Path) -> None:
    res = bg_nbd("-k", str(tmp_path / "s.sock"), "-s", "-f", "raw", str(image), pre=("-p", "no:qcow2"))
    assert res.returncode == 1
    assert "qemu-nbd: --snapshot needs a temporary qcow2 overlay" in res.stderr
    assert "blockgraph-qcow2" in res.stderr


# ---------------------------------------------------------------- serving


@need("qemu-io")
def test_snapshot_keeps_writes_in_a_temporary_overlay(image: Path, serve: callable, tmp_path: Path) -> None:
    before = image.read_bytes()
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    s = serve("-t", "-s", "-f", "raw", str(image), env={"TMPDIR": str(tmp)})
    out = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x66 0 64k", "-c", "read -P 0x66 0 64k",
                          "-c", "read -P 0x10 65552 1", s.uri()], capture_output=True, text=True, timeout=60).stdout
    assert "Pattern verification failed" not in out and "wrote 65536/65536" in out
    assert list(tmp.iterdir()) == []  # the overlay was deleted once open
    assert s.stop() == 0
    assert image.read_bytes() == before


@need("nbdinfo")
def test_exits_after_the_first_client_unless_persistent(image: Path, serve: callable) -> None:
    once = serve("-f", "raw", "-x", "disk", "-D", "my disk", str(image))
    out = nbdinfo(once.uri("disk"))
    assert "description: my disk" in out and "export-size: 4194304" in out
    assert "can_multi_conn: false" in out  # -e 1: a second connection would wait forever
    assert once.wait() == 0
    assert not once.sock.exists()

    kept = serve("-t", "-f", "raw", "-e", "0", str(image))
    for _ in range(2):
        assert "can_multi_conn: true" in nbdinfo(kept.uri())
    assert kept.proc.poll() is None
    assert kept.stop() == 0
    assert not kept.sock.exists()


@need("nbdinfo")
def test_list_does_not_end_a_non_persistent_server(image: Path, serve: callable) -> None:
    s = serve("-f", "raw", "-x", "disk", str(image))
    listing = json.loads(nbdinfo("--list", "--json", s.uri()))
    assert [e["export-name"] for e in listing["exports"]] == ["disk"]
    time.sleep(0.2)  # give a wrongly exiting server the chance to show it
    assert s.proc.poll() is None  # --list never entered transmission (qemu-nbd counts negotiated clients)
    assert nbdinfo("--size", s.uri("disk")).strip() == "4194304"
    assert s.wait() == 0


@need("nbdinfo")
def test_read_only_allocation_depth_and_offset(image: Path, serve: callable) -> None:
    s = serve("-t", "-r", "-A", "-f", "raw", "-o", "1048576", str(image))
    info = json.loads(nbdinfo("--json", s.uri()))["exports"][0]
    assert info["is_read_only"] is True
    assert info["export-size"] == 3 * MiB
    assert "qemu:allocation-depth" in info["contexts"]
    if shutil.which("qemu-io"):
        out = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 1", "-c", "read -P 1 1 1",
                              s.uri()], capture_output=True, text=True, timeout=60).stdout
        assert "Pattern verification failed" not in out and out.count("read 1/1") == 2
    assert s.stop() == 0


@need("qemu-io")
def test_writes_and_cache_modes(image: Path, serve: callable) -> None:
    s = serve("-t", "--cache=writethrough", "--discard=unmap", "--detect-zeroes=unmap", "--aio=threads",
              "-f", "raw", str(image))
    out = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 64k 64k", "-c", "write -P 0 128k 64k",
                          s.uri()], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.count("wrote 65536/65536") == 2
    assert s.stop() == 0
    data = image.read_bytes()
    assert data[64 * 1024:128 * 1024] == b"\x42" * 65536
    assert data[128 * 1024:192 * 1024] == bytes(65536)


@need("nbdinfo")
def test_image_opts(image: Path, serve: callable) -> None:
    s = serve("-t", "--image-opts", f"driver=raw,offset=512,file.driver=file,file.filename={image}")
    assert "export-size: 4193792" in nbdinfo(s.uri())
    assert s.stop() == 0


@need("nbdinfo")
def test_fork_and_pid_file(image: Path, tmp_path: Path) -> None:
    sock, pidfile = tmp_path / "f.sock", tmp_path / "nbd.pid"
    errors = tmp_path / "stderr"
    with open(errors, "w") as err:  # the server keeps stderr: a pipe would never reach end of file
        res = subprocess.run([*BLOCKGRAPH, "nbd", "--fork", "--pid-file", str(pidfile), "-t", "-k", str(sock),
                              "-f", "raw", str(image)], stdout=subprocess.DEVNULL, stderr=err, timeout=60)
    assert res.returncode == 0 and errors.read_text() == ""
    pid = int(pidfile.read_text())
    try:
        assert sock.exists()  # the parent returned only once the child listened
        assert "export-size: 4194304" in nbdinfo(f"nbd+unix:///?socket={sock}")
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while pidfile.exists():
        assert time.monotonic() < deadline, "the forked server did not exit on SIGTERM"
        time.sleep(0.02)


def test_fork_refuses_a_relative_socket_as_qemu_nbd(image: Path, tmp_path: Path) -> None:
    """qemu-nbd --fork refuses ``-k rel.sock`` (the daemon moves to "/"); nothing is left behind."""
    res = subprocess.run([*BLOCKGRAPH, "nbd", "--fork", "-k", "rel.sock", "-f", "raw", str(image)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert (res.returncode, res.stderr) == (1, "qemu-nbd: socket path must be absolute\n")
    assert not (tmp_path / "rel.sock").exists()


def test_fork_relays_errors(tmp_path: Path) -> None:
    res = subprocess.run([*BLOCKGRAPH, "nbd", "--fork", "-k", str(tmp_path / "x.sock"), "-f", "raw",
                          str(tmp_path / "missing.raw")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.startswith("qemu-nbd: Failed to blk_new_open ")
