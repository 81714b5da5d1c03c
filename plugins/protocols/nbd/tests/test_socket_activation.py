"""systemd socket activation (LISTEN_PID/LISTEN_FDS, fd 3) in ``blockgraph nbd``, against qemu-nbd 7.2:
libnbd's captive mode (``nbdinfo -- [ SERVER ]``, nbdcopy, the Python bindings) sees the same export,
and the refusals of options that name where to listen are qemu-nbd's to the byte."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from blockgraph_nbd import activation

TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy")
peers = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                           reason="qemu-img/qemu-io/qemu-nbd (qemu-utils) or nbdinfo/nbdcopy (libnbd-bin) missing")
pytestmark = pytest.mark.interop
BLOCKGRAPH = [sys.executable, "-m", "blockgraph.cli.main", "nbd"]
QEMU_NBD = ["qemu-nbd"]
SERVERS = {"qemu-nbd": QEMU_NBD, "blockgraph": BLOCKGRAPH}
MiB = 1 << 20
TIMEOUT = 60

# Started by a launcher that binds a unix socket, puts it at fd 3 and execs the server with LISTEN_PID set
# to its own pid (what systemd and libnbd do). MODE: "ok", "two" (fds 3 and 4), "closed" (no fd 3),
# "file" (fd 3 is not a socket), "other-pid" (LISTEN_PID names someone else).
LAUNCHER = r"""
import os, socket, sys
fds, mode, path, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
listener = socket.socket(socket.AF_UNIX)
listener.bind(path + ".tmp")
listener.listen(4)
os.rename(path + ".tmp", path)  # the path appears once it accepts connections
if listener.fileno() != 3:
    os.dup2(listener.fileno(), 3)
os.set_inheritable(3, True)
if mode == "two":
    os.dup2(3, 4)
elif mode == "closed":
    os.close(3)
elif mode == "file":
    os.dup2(os.open(os.devnull, os.O_RDONLY), 3)
pid = "1" if mode == "other-pid" else str(os.getpid())
os.execvpe(argv[0], argv, dict(os.environ, LISTEN_FDS=fds, LISTEN_PID=pid))
"""


def run(*cmd: str, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kw)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 MiB qcow2: data, a zeroed cluster range, data past the middle; b0 (64 KiB granules) and b1 (4 KiB)
    dirtied by the writes, b2 disabled."""
    path = tmp_path_factory.mktemp("sa") / "img.qcow2"
    assert run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "10M").returncode == 0
    for args in (["b0"], ["-g", "4096", "b1"], ["--disable", "b2"]):
        assert run("qemu-img", "bitmap", "--add", str(path), *args[-1:], *args[:-1]).returncode == 0
    cmd = ["qemu-io"]
    for w in ("write -P 1 0 1M", "write -P 2 1M 100k", "write -z 5M 64k", "write -P 3 9M 512"):
        cmd += ["-c", w]
    assert run(*cmd, str(path)).returncode == 0
    return path


@pytest.fixture
def copies(tmp_path: Path, image: Path) -> Callable[[str], Path]:
    """A private copy of the image per server (a writable server marks bitmaps in use)."""
    def copy(tag: str) -> Path:
        dst = tmp_path / f"{tag}.qcow2"
        shutil.copyfile(image, dst)
        return dst
    return copy


def captive(tool: list[str], server: list[str], args: list[str]) -> subprocess.CompletedProcess:
    """``TOOL -- [ SERVER ARGS ]``: libnbd starts the server with a socket at fd 3."""
    return run(*tool, "--", "[", *server, *args, "]")


def both(tool: list[str], args: list[str], copies: Callable[[str], Path]) \
        -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    q = captive(tool, QEMU_NBD, [*args, str(copies("q"))])
    b = captive(tool, BLOCKGRAPH, [*args, str(copies("b"))])
    return q, b


# ---------------------------------------------------------------- libnbd's captive mode


@peers
@pytest.mark.parametrize("args", [["-r", "-f", "qcow2"], ["-f", "qcow2"], ["-t", "-r", "-f", "qcow2"],
                                  ["-f", "qcow2", "-A", "-B", "b1", "-D", "a disk"]],
                         ids=["ro", "rw", "persistent", "contexts"])
def test_nbdinfo_sees_what_qemu_nbd_shows(args: list[str], copies: Callable[[str], Path]) -> None:
    q, b = both(["nbdinfo"], args, copies)
    assert q.returncode == 0, q.stderr
    assert (b.returncode, b.stderr) == (0, "")
    assert "export-size: 10485760" in b.stdout
    assert b.stdout == q.stdout


@peers
def test_export_name_applies_as_without_activation(copies: Callable[[str], Path]) -> None:
    """``-x disk``: listed under its name, and a client asking for "" is turned away with qemu-nbd's reply."""
    q, b = both(["nbdinfo", "--list"], ["-r", "-f", "qcow2", "-x", "disk", "-D", "d"], copies)
    assert q.returncode == b.returncode == 0
    assert 'export="disk":' in b.stdout and b.stdout == q.stdout
    q, b = both(["nbdinfo"], ["-r", "-f", "qcow2", "-x", "disk"], copies)
    assert q.returncode == b.returncode == 1
    assert "No such file or directory for the default export" in b.stderr
    assert (b.stdout, b.stderr) == (q.stdout, q.stderr)


@peers
def test_map_equals_qemu_nbd(copies: Callable[[str], Path]) -> None:
    q, b = both(["nbdinfo", "--map"], ["-r", "-f", "qcow2"], copies)
    assert q.returncode == b.returncode == 0
    assert "hole,zero" in b.stdout and b.stdout == q.stdout


@peers
@pytest.mark.parametrize("name", ["b0", "b1", "b2"])
def test_dirty_bitmap_map_equals_qemu_nbd(name: str, copies: Callable[[str], Path]) -> None:
    q, b = both(["nbdinfo", f"--map=qemu:dirty-bitmap:{name}"], ["-f", "qcow2", "-B", name], copies)
    assert q.returncode == 0, q.stderr
    assert (b.returncode, b.stderr) == (0, "")
    assert b.stdout == q.stdout
    assert ("dirty" in b.stdout) == (name != "b2")


@peers
def test_nbdcopy_reads_the_right_bytes(image: Path, tmp_path: Path) -> None:
    expected, out = tmp_path / "expected.raw", tmp_path / "out.raw"
    assert run("qemu-img", "convert", "-O", "raw", str(image), str(expected)).returncode == 0
    res = run("nbdcopy", "--", "[", *BLOCKGRAPH, "-r", "-f", "qcow2", str(image), "]", str(out))
    assert (res.returncode, res.stderr) == (0, "")
    assert out.read_bytes() == expected.read_bytes()


@peers
def test_nbdcopy_writes_through_a_captive_server(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.raw", tmp_path / "dst.qcow2"
    src.write_bytes(os.urandom(MiB) + bytes(2 * MiB) + b"\xab" * MiB)
    assert run("qemu-img", "create", "-q", "-f", "qcow2", str(dst), "4M").returncode == 0
    res = run("nbdcopy", str(src), "--", "[", *BLOCKGRAPH, "-f", "qcow2", str(dst), "]")
    assert (res.returncode, res.stderr) == (0, "")
    res = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(dst))
    assert res.returncode == 0, res.stdout + res.stderr


def test_python_bindings_connect_systemd_socket_activation(image: Path) -> None:
    if "/usr/lib/python3/dist-packages" not in sys.path:
        sys.path.append("/usr/lib/python3/dist-packages")
    nbd = pytest.importorskip("nbd", reason="libnbd's Python bindings (python3-libnbd) are not importable")
    h = nbd.NBD()  # connect_systemd_socket_activation exists since libnbd 1.6 (Debian 12 ships 1.14)
    h.add_meta_context("base:allocation")
    h.connect_systemd_socket_activation([*BLOCKGRAPH, "-r", "-f", "qcow2", str(image)])
    try:
        assert h.get_size() == 10 * MiB
        assert h.is_read_only()
        assert h.pread(4096, MiB - 2048) == b"\x01" * 2048 + b"\x02" * 2048
        extents: list[int] = []

        def collect(_ctx: str, _offset: int, entries: list[int], _err: object) -> int:
            extents.extend(entries)
            return 0

        h.block_status(2 * MiB, 4 * MiB, collect)
        assert extents[:2] == [2 * MiB, nbd.STATE_HOLE | nbd.STATE_ZERO]
    finally:
        h.shutdown()


# ---------------------------------------------------------------- started through a launcher


def launch(server: list[str], fds: str, mode: str, args: list[str], path: Path) -> subprocess.Popen:
    """``server args`` activated on a unix socket the launcher binds at ``path``."""
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, fds, mode, str(path), *server, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


ERROR_CASES = [  # (LISTEN_FDS, launcher mode, options)
    ("1", "ok", ["-k", "/tmp/never-made.sock"]),
    ("1", "ok", ["-b", "127.0.0.1"]),
    ("1", "ok", ["-p", "10810"]),
    ("1", "ok", ["-b", "127.0.0.1", "-k", "/tmp/never-made.sock"]),
    ("1", "ok", ["-k", "/tmp/never-made.sock", "-c", "/dev/nbd0"]),
    ("1", "ok", ["--selinux-label", "x"]),
    ("1", "ok", ["--tls-creds", "tls0"]),
    ("1", "ok", ["--tls-authz", "a"]),
    ("1", "ok", ["--image-opts", "-f", "raw"]),
    ("1", "ok", ["-L"]),
    ("1", "ok", ["-L", "NO-IMAGE"]),
    ("2", "two", []),
    ("2", "ok", []),
    ("2", "ok", ["-k", "/tmp/never-made.sock"]),
    ("3", "two", []),
    ("1", "closed", []),
    ("1", "file", []),
]


@peers
@pytest.mark.parametrize(("fds", "mode", "args"), ERROR_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_refusals_match_qemu_nbd(fds: str, mode: str, args: list[str], image: Path, tmp_path: Path) -> None:
    out = {}
    for tag, server in SERVERS.items():
        full = args[:-1] if args[-1:] == ["NO-IMAGE"] else [*args, str(image)]
        proc = launch(server, fds, mode, full, tmp_path / f"{tag}-activated.sock")
        try:
            _stdout, stderr = proc.communicate(timeout=TIMEOUT)
        finally:
            proc.kill()
        out[tag] = (proc.returncode, stderr)
    assert out["qemu-nbd"][0] == 1 and out["qemu-nbd"][1].startswith("qemu-nbd: ")
    assert mode == "closed" or "invalid file descriptor fd = 3" not in out["qemu-nbd"][1]  # the launcher works
    assert out["blockgraph"] == out["qemu-nbd"]


PLAIN_CASES = [  # without activation: the checks around it keep qemu-nbd's order
    ["-c", "/dev/nbd0"],
    ["--tls-creds", "tls0", "-k", "/tmp/never-made.sock", "IMAGE"],
    ["--tls-creds", "tls0", "-c", "/dev/nbd0", "IMAGE"],
    ["--tls-creds", "tls0", "--tls-hostname", "h", "IMAGE"],
    ["--tls-hostname", "h", "IMAGE"],
    ["-L", "IMAGE"],
    ["-L", "-x", "disk"],
    ["-L", "--fork"],
]


@peers
@pytest.mark.parametrize("args", PLAIN_CASES, ids=" ".join)
def test_option_checks_in_qemu_nbd_order(args: list[str], image: Path) -> None:
    args = [str(image) if a == "IMAGE" else a for a in args]
    ours, theirs = run(*BLOCKGRAPH, *args), run(*QEMU_NBD, *args)
    assert theirs.returncode == 1 and theirs.stderr.startswith("qemu-nbd: ")
    assert (ours.returncode, ours.stderr) == (theirs.returncode, theirs.stderr)


NOT_ACTIVATED = [("0", "ok"), ("x", "ok"), ("1 ", "ok"), ("1", "other-pid")]


@peers
@pytest.mark.parametrize(("fds", "mode"), NOT_ACTIVATED, ids=["0", "x", "trailing-blank", "other-pid"])
def test_no_activation_listens_where_told(fds: str, mode: str, image: Path, tmp_path: Path) -> None:
    """LISTEN_FDS=0 or unparsable, or LISTEN_PID not ours: ``-k`` is honoured, as by qemu-nbd."""
    for tag, server in SERVERS.items():
        sock = tmp_path / f"{tag}.sock"
        proc = launch(server, fds, mode, ["-k", str(sock), "-r", "-f", "qcow2", str(image)],
                      tmp_path / f"{tag}-activated.sock")
        try:
            assert _wait_for(sock, proc), f"{tag}: {proc.stderr.read()}"
            res = run("nbdinfo", "--size", f"nbd+unix:///?socket={sock}")
            assert res.stdout == f"{10 * MiB}\n", f"{tag}: {res.stderr}"
            assert proc.wait(TIMEOUT) == 0  # not persistent: the only client has left
        finally:
            proc.kill()
            proc.wait(TIMEOUT)


def _wait_for(path: Path, proc: subprocess.Popen) -> bool:
    """Until ``path`` exists (False if the server exits first); a unix socket appears once it listens."""
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@peers
@pytest.mark.parametrize("persistent", [False, True], ids=["once", "persistent"])
def test_persistent_or_not_as_without_activation(persistent: bool, image: Path, tmp_path: Path) -> None:
    """Without ``-t`` the activated server exits once its client leaves; with it, a second client gets in."""
    for tag, server in SERVERS.items():
        args = (["-t"] if persistent else []) + ["-r", "-f", "qcow2", str(image)]
        sock = tmp_path / f"{tag}-{persistent}.sock"
        proc = launch(server, "1", "ok", args, sock)
        try:
            assert _wait_for(sock, proc)
            first = run("nbdinfo", "--size", f"nbd+unix:///?socket={sock}")
            assert first.stdout == f"{10 * MiB}\n", f"{tag}: {first.stderr}"
            if persistent:
                second = run("nbdinfo", "--size", f"nbd+unix:///?socket={sock}")
                assert second.stdout == f"{10 * MiB}\n", f"{tag}: {second.stderr}"
                assert proc.poll() is None
            else:
                assert proc.wait(TIMEOUT) == 0, tag
        finally:
            proc.kill()
            proc.wait(TIMEOUT)


# ---------------------------------------------------------------- the environment, read as qemu reads it


@pytest.mark.parametrize(("text", "value"), [
    ("1", 1), (" 1", 1), ("+1", 1), ("01", 1), ("\t7", 7), ("-1", (1 << 64) - 1),
    ("18446744073709551615", (1 << 64) - 1),
    ("1 ", None), ("0x1", None), ("", None), ("1.0", None), ("+", None), ("٣", None), ("18446744073709551616", None),
])
def test_strtoul_as_qemu(text: str, value: int | None) -> None:
    assert activation._strtoul(text) == value


def test_variables_are_consumed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ours and a count that parses: removed so children do not inherit them (0 sockets: listen as usual)."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    assert activation.socket_activation() == (0, None)
    assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert activation.socket_activation() == (0, None)
    assert os.environ["LISTEN_FDS"] == "1"  # not ours: left alone


def test_activated_socket_is_not_unlinked(image: Path, tmp_path: Path) -> None:
    """The socket file belongs to whoever bound it (systemd): still there after the server exits."""
    sock = tmp_path / "activated.sock"
    proc = launch(BLOCKGRAPH, "1", "ok", ["-r", "-f", "qcow2", str(image)], sock)
    try:
        assert _wait_for(sock, proc)
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(sock))
            assert c.recv(8) == b"NBDMAGIC"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        assert sock.exists()
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
