"""Image locking against real qemu-io / qemu-img: both sides see each other's byte-range locks.

A long-running qemu-io holds an image while its stdin stays open (it prints ``qemu-io> `` once the
image is open). Which bytes each side holds is read from ``/proc/<pid>/fdinfo/<fd>``, so the
blockgraph locks can be compared byte for byte with QEMU's for the same open mode.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from blockgraph.backend import BlockBackend
from blockgraph.errors import ImageLocked

QEMU_IO, QEMU_IMG = shutil.which("qemu-io"), shutil.which("qemu-img")
pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not (QEMU_IO and QEMU_IMG), reason="qemu-io and qemu-img are not installed"),
]

LOCK_LINE = re.compile(r"^lock:\s+\d+:\s+OFDLCK\s+ADVISORY\s+(?:READ|WRITE)\s+-?\d+\s+\S+\s+(\d+)\s+(\d+|EOF)$")


def fd_lock_bytes(pid: int | str, fd: int | str) -> set[int]:
    """The OFD lock bytes held through one descriptor of one process."""
    held: set[int] = set()
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        m = LOCK_LINE.match(line)
        if m:
            start, end = int(m.group(1)), m.group(2)
            held.update(range(start, (int(end) if end != "EOF" else start) + 1))
    return held


def process_lock_bytes(pid: int, path: Path) -> set[int]:
    """The lock bytes process ``pid`` holds on ``path``, through whichever descriptors it has open."""
    target = os.path.realpath(path)
    held: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                held |= fd_lock_bytes(pid, fd)
        except OSError:
            continue
    return held


def node_lock_bytes(node: Any) -> set[int]:
    """The lock bytes blockgraph's file node below ``node`` holds (through its own descriptor)."""
    while node.driver_name != "file":
        node = (node.file or node.filtered).node
    return fd_lock_bytes("self", node.driver.fd)


class Holder:
    """qemu-io keeping an image open until :meth:`close`."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.proc = subprocess.Popen([QEMU_IO, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=cwd)
        out = b""
        while b"qemu-io> " not in out:
            ready, _, _ = select.select([self.proc.stdout], [], [], 60)
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                err = self.proc.stderr.read().decode() if self.proc.poll() is not None else "(no prompt)"
                self.close()
                raise AssertionError(f"qemu-io {' '.join(args)} did not start: {err}")
            out += chunk

    def locks(self, path: Path) -> set[int]:
        return process_lock_bytes(self.proc.pid, path)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def holders(tmp_path: Path) -> Iterator[Any]:
    started: list[Holder] = []

    def start(*args: str) -> Holder:
        h = Holder(*args, cwd=tmp_path)
        started.append(h)
        return h

    yield start
    for h in started:
        h.close()


def tool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = QEMU_IO if args[0] == "io" else QEMU_IMG
    return subprocess.run([exe, *args[1:]], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    raw, qcow2 = tmp_path / "r.img", tmp_path / "q.qcow2"
    for fmt, path in (("raw", raw), ("qcow2", qcow2)):
        out = tool("img", "create", "-f", fmt, str(path), "1M", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
    return {"raw": raw, "qcow2": qcow2}


def open_backend(session: Any, run: Any, spec: dict[str, Any], *, read_only: bool = False,
                 share_all: bool = True) -> BlockBackend:
    node = run(session.open_node({"read-only": read_only, **spec}))
    try:
        return run(BlockBackend.attach_new(session, node, read_only=read_only, share_all=share_all))
    except BaseException:
        from blockgraph.node import close_node

        run(close_node(node))
        raise


def file_spec(path: Path) -> dict[str, Any]:
    return {"driver": "file", "filename": str(path)}


def raw_spec(path: Path, **extra: Any) -> dict[str, Any]:
    return {"driver": "raw", "file": file_spec(path), **extra}


def tcow_spec(path: Path) -> dict[str, Any]:
    """A format node whose file child holds metadata, as qcow2's does."""
    return {"driver": "tcow", "file": file_spec(path)}


def qemu_refusal(stderr: str) -> str:
    """qemu-img/qemu-io's error without the tool's own "Could not open 'x': " prefix."""
    line = stderr.strip()
    for prefix in (r"qemu-img: Could not open '[^']*': ", r"qemu-io: can't open device \S+: "):
        line = re.sub("^" + prefix, "", line)
    return line


# ---------------------------------------------------------------- qemu holds, blockgraph asks


def test_qemu_writer_on_qcow2_keeps_blockgraph_writers_out(images: dict[str, Path], holders: Any,
                                                           tsession: Any, bg_runner: Any) -> None:
    q = images["qcow2"]
    h = holders("-f", "qcow2", str(q))
    assert h.locks(q) == {100, 101, 103, 201, 203}
    for spec in (file_spec(q), raw_spec(q)):
        with pytest.raises(ImageLocked) as info:
            open_backend(tsession, bg_runner.run, spec)
        assert str(info.value) == f'Failed to get "write" lock\nIs another process using the image [{q}]?'
    assert tsession.nodes == {}
    # The same refusal, word for word, as qemu-io's own writer gets.
    out = tool("io", "-f", "raw", "-c", "write 0 512", str(q), cwd=q.parent)
    assert out.returncode == 1 and qemu_refusal(out.stderr) == str(info.value)
    # Reading without unsharing write is fine, as for qemu-io -r -f raw.
    reader = open_backend(tsession, bg_runner.run, raw_spec(q), read_only=True)
    assert node_lock_bytes(reader.node) == {100}
    assert h.locks(q) == {100, 101, 103, 201, 203}


def test_raw_writers_share_but_exclusive_openers_are_refused(images: dict[str, Path], holders: Any,
                                                             tsession: Any, bg_runner: Any) -> None:
    r = images["raw"]
    h = holders("-f", "raw", str(r))
    assert h.locks(r) == {100, 101}
    # QEMU's rule: raw passes "share everything" through, so two raw writers coexist.
    writer = open_backend(tsession, bg_runner.run, raw_spec(r))
    bg_runner.run(writer.pwritev(0, memoryview(bytearray(b"bg" * 256))))
    assert node_lock_bytes(writer.node) == {100, 101}
    # An opener that does not share write (qemu-img convert's source, BlockBackend(share_all=False)).
    for read_only in (True, False):
        with pytest.raises(ImageLocked) as info:
            open_backend(tsession, bg_runner.run, raw_spec(r), read_only=read_only, share_all=False)
        assert str(info.value) == f'Failed to get shared "write" lock\nIs another process using the image [{r}]?'
    out = tool("img", "convert", "-f", "raw", "-O", "raw", str(r), str(r.parent / "copy.img"), cwd=r.parent)
    assert out.returncode == 1 and qemu_refusal(out.stderr) == str(info.value)
    # The refused attempts left nothing locked behind: the writer still holds exactly its two bytes.
    assert node_lock_bytes(writer.node) == {100, 101} and h.locks(r) == {100, 101}


def test_failed_permission_upgrade_releases_the_bytes_it_tried(images: dict[str, Path], holders: Any,
                                                               tsession: Any, bg_runner: Any) -> None:
    r = images["raw"]
    reader = open_backend(tsession, bg_runner.run, raw_spec(r), read_only=True)
    h = holders("-f", "raw", str(r))
    other = open_backend(tsession, bg_runner.run, raw_spec(r), share_all=True)
    assert node_lock_bytes(reader.node) == {100}
    # Growing the writer (truncate takes resize) is fine; unsharing write is not, and is undone.
    from blockgraph.perms import Perm

    with pytest.raises(ImageLocked, match='Failed to get shared "write" lock'):
        other.set_perm(Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
    assert node_lock_bytes(other.node) == {100, 101} and other.node.file.node.driver._pending is None
    bg_runner.run(other.truncate(2 << 20))
    assert node_lock_bytes(other.node) == {100, 101} and r.stat().st_size == 2 << 20
    assert h.locks(r) == {100, 101}


# ---------------------------------------------------------------- blockgraph holds, qemu asks


def test_blockgraph_exclusive_raw_writer_keeps_qemu_out(images: dict[str, Path], tsession: Any,
                                                        bg_runner: Any) -> None:
    r = images["raw"]
    blk = open_backend(tsession, bg_runner.run, raw_spec(r), share_all=False)
    assert node_lock_bytes(blk.node) == {100, 101, 201, 203}
    out = tool("io", "-f", "raw", "-c", "write 0 512", str(r), cwd=r.parent)
    assert out.returncode == 1
    assert qemu_refusal(out.stderr) == f'Failed to get "write" lock\nIs another process using the image [{r}]?'
    out = tool("img", "convert", "-f", "raw", "-O", "raw", str(r), str(r.parent / "copy.img"), cwd=r.parent)
    assert out.returncode == 1 and 'Failed to get shared "write" lock' in out.stderr
    # Readers that share write get in; so does qemu-img info, which takes no permission on raw.
    assert tool("io", "-r", "-f", "raw", "-c", "read 0 512", str(r), cwd=r.parent).returncode == 0
    assert tool("img", "info", "-U", str(r), cwd=r.parent).returncode == 0
    assert tool("img", "info", str(r), cwd=r.parent).returncode == 0
    bg_runner.run(blk.close())
    assert tool("io", "-f", "raw", "-c", "write 0 512", str(r), cwd=r.parent).returncode == 0


def test_blockgraph_metadata_node_locks_like_qcow2(images: dict[str, Path], holders: Any, tsession: Any,
                                                   bg_runner: Any) -> None:
    q = images["qcow2"]
    h = holders("-f", "qcow2", str(q))
    qemu_bytes = h.locks(q)
    h.close()
    blk = open_backend(tsession, bg_runner.run, tcow_spec(q))
    assert node_lock_bytes(blk.node) == qemu_bytes == {100, 101, 103, 201, 203}
    info = tool("img", "info", str(q), cwd=q.parent)
    assert info.returncode == 1
    assert qemu_refusal(info.stderr) == f'Failed to get shared "write" lock\nIs another process using the image [{q}]?'
    out = tool("io", "-c", "write 0 512", str(q), cwd=q.parent)
    assert out.returncode == 1 and qemu_refusal(out.stderr).startswith('Failed to get "write" lock')
    forced = tool("img", "info", "-U", str(q), cwd=q.parent)
    assert forced.returncode == 0 and "file format: qcow2" in forced.stdout
    bg_runner.run(blk.close())
    assert tool("img", "info", str(q), cwd=q.parent).returncode == 0


# ---------------------------------------------------------------- the same bytes as QEMU, mode by mode

MODES = [
    # (name, qemu-io arguments, blockgraph spec, read_only, expected bytes)
    ("raw rw", ["-f", "raw", "{raw}"], lambda im: raw_spec(im["raw"]), False, {100, 101}),
    ("raw ro", ["-r", "-f", "raw", "{raw}"], lambda im: raw_spec(im["raw"]), True, {100}),
    ("qcow2-like rw", ["-f", "qcow2", "{qcow2}"], lambda im: tcow_spec(im["qcow2"]), False,
     {100, 101, 103, 201, 203}),
    ("qcow2-like ro", ["-r", "-f", "qcow2", "{qcow2}"], lambda im: tcow_spec(im["qcow2"]), True, {100, 201, 203}),
    ("raw window rw", ['json:{{"driver": "raw", "offset": 512, "file": {{"driver": "file", '
                       '"filename": "{raw}"}}}}'], lambda im: raw_spec(im["raw"], offset=512), False,
     {100, 101, 203}),
    ("raw window ro", ["-r", 'json:{{"driver": "raw", "offset": 512, "file": {{"driver": "file", '
                             '"filename": "{raw}"}}}}'], lambda im: raw_spec(im["raw"], offset=512), True,
     {100, 203}),
]


@pytest.mark.parametrize(("mode", "qemu_args", "spec", "read_only", "expected"), MODES, ids=[m[0] for m in MODES])
def test_lock_bytes_match_qemu(images: dict[str, Path], holders: Any, tsession: Any, bg_runner: Any, mode: str,
                               qemu_args: list[str], spec: Any, read_only: bool, expected: set[int]) -> None:
    path = images["qcow2" if "qcow2" in mode else "raw"]
    h = holders(*[a.format(raw=images["raw"], qcow2=images["qcow2"]) for a in qemu_args])
    qemu_bytes = h.locks(path)
    h.close()
    blk = open_backend(tsession, bg_runner.run, spec(images), read_only=read_only)
    assert node_lock_bytes(blk.node) == qemu_bytes == expected
    bg_runner.run(blk.close())
    assert tsession.nodes == {}


@pytest.mark.parametrize("args", [["info"], ["check"], ["map"], ["measure", "-O", "qcow2"], ["compare", "q.qcow2"],
                                  ["snapshot", "-l"], ["convert", "-O", "raw", "q.qcow2", "out.raw"]])
def test_img_refuses_a_held_image_with_qemu_img_lines(images: dict[str, Path], holders: Any, tmp_path: Path,
                                                       args: list[str]) -> None:
    """qemu-io holds the qcow2 for writing: every img subcommand fails as qemu-img's does, line for line."""
    import sys

    holders("q.qcow2")
    argv = [*args, "q.qcow2"] if args[0] != "convert" else args
    real = tool("img", *argv, cwd=tmp_path)
    ours = subprocess.run([str(Path(sys.executable).with_name("blockgraph")), "img", *argv], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert real.returncode != 0 and "Is another process using the image" in real.stderr
    assert (ours.returncode, ours.stdout, ours.stderr) == (real.returncode, real.stdout, real.stderr)
