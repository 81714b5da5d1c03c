"""``blockgraph serve``'s command line against the real qemu-storage-daemon: the same bad options give
the same messages; --help, --version, --pidfile, --daemonize and signals behave as QSD's."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from blockgraph.daemon.harness import BLOCKGRAPH, ServeProcess

QSD = shutil.which("qemu-storage-daemon")
needs_qsd = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon (Debian qemu-system-common) not installed")


def run(program: list[str], args: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*program, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def message(stderr: str) -> str:
    """The error without the program name (``qemu-storage-daemon: `` / ``blockgraph serve: ``)."""
    line = stderr.strip().splitlines()[-1]
    return re.sub(r"^\S*(qemu-storage-daemon|blockgraph serve): ", "", line)


BAD_LINES = [
    ["--blockdev"],
    ["--bogus"],
    ["-x"],
    ["-T"],
    ["--daemonize=1"],
    ["extra"],
    ["--blockdev", "driver=file"],
    ["--blockdev", "driver=null-co"],
    ["--blockdev", "driver=file,filename=/nonexistent/x.img,node-name=x"],
    ["--blockdev", "foo"],
    ["--blockdev", '{"driver": "null-co", "node-name": "n", "x": 1}'],
    ["--blockdev", "null-co,node-name=n", "--blockdev", "driver=null-co,node-name=n"],
    ["--object", "foo,id=x"],
    ["--object", "throttle-group,id=t,x-foo=1"],
    ["--chardev", "foo,id=c"],
    ["--chardev", "socket,path=/tmp/blockgraph-never.sock,server=on"],
    ["--monitor", "chardev=zz"],
    ["--chardev", "stdio,id=x", "--daemonize"],
    ["--export", "type=foo,id=e,node-name=n"],
    ["--pidfile"],
]


@needs_qsd
@pytest.mark.parametrize("args", BAD_LINES, ids=lambda a: " ".join(a)[:40])
def test_bad_options_fail_as_qemu_storage_daemon(args: list[str]) -> None:
    theirs = run([QSD], args)
    ours = run(BLOCKGRAPH, args)
    assert theirs.returncode == 1 and ours.returncode == 1
    assert message(ours.stderr) == message(theirs.stderr)


def test_help_and_version() -> None:
    h = run(BLOCKGRAPH, ["-h"])
    assert h.returncode == 0 and h.stdout.startswith("Usage: blockgraph serve [options]")
    for opt in ("--blockdev", "--drive", "--chardev", "--monitor", "--export", "--nbd-server", "--object",
                "--pidfile", "--daemonize"):
        assert opt in h.stdout
    v = run(BLOCKGRAPH, ["--version"])
    assert v.returncode == 0 and v.stdout.startswith("blockgraph serve version ")


def test_object_help_lists_throttle_group() -> None:
    r = run(BLOCKGRAPH, ["--object", "help"])
    assert r.returncode == 0 and r.stdout.splitlines()[:1] == ["List of user creatable objects:"]
    assert "  throttle-group" in r.stdout.splitlines()


def test_trace_is_accepted_with_a_warning(tmp_path: Path) -> None:
    with ServeProcess(tmp_path, ["-T", "bdrv_*"]) as d:
        assert d.stop() == 0
    assert "tracing is not supported" in d.stderr


def test_pidfile_is_locked_while_running_and_removed_on_sigterm(tmp_path: Path) -> None:
    with ServeProcess(tmp_path, []) as d:
        assert int(Path(d.pidfile).read_text()) == d.proc.pid
        second = run(BLOCKGRAPH, ["--pidfile", d.pidfile])
        assert second.returncode == 1
        assert message(second.stderr) == "cannot create PID file: Cannot lock pid file: Resource temporarily " \
                                         "unavailable"
        assert d.stop(signal.SIGTERM) == 0
    assert not Path(d.pidfile).exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_other_signals_shut_down_cleanly(tmp_path: Path, sig: int) -> None:
    with ServeProcess(tmp_path, ["--blockdev", "null-co,node-name=n"]) as d:
        assert d.stop(sig) == 0
    assert not Path(d.pidfile).exists() and not Path(d.socket).exists()


SIGNAL_AT_PIDFILE = """
import os, signal, sys
from blockgraph.daemon import run
from blockgraph.cli.main import main

class PidFile(run.PidFile):  # signals the daemon the moment its pid file exists, as a harness may
    def __init__(self, path):
        super().__init__(path)
        os.kill(os.getpid(), signal.SIGHUP)

run.PidFile = PidFile
sys.exit(main(["serve", "--blockdev", "null-co,node-name=n", "--pidfile", sys.argv[1]]))
"""


def test_a_signal_right_after_the_pid_file_shuts_down_cleanly(tmp_path: Path) -> None:
    """The handlers are in place before the pid file tells anyone the daemon is there."""
    pidfile = tmp_path / "s.pid"
    r = subprocess.run([BLOCKGRAPH[0], "-c", SIGNAL_AT_PIDFILE, str(pidfile)], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stderr) == (0, "")
    assert not pidfile.exists()


def _qmp(sock: str, *commands: dict) -> list[dict]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(sock)
    f = s.makefile("rwb")
    out = [json.loads(f.readline())]
    for cmd in commands:
        f.write(json.dumps(cmd).encode() + b"\n")
        f.flush()
        out.append(json.loads(f.readline()))
    s.close()
    return out


def test_daemonize_returns_once_ready_and_the_child_serves(tmp_path: Path) -> None:
    sock, pidfile = tmp_path / "d.sock", tmp_path / "d.pid"
    r = run(BLOCKGRAPH, ["--daemonize", "--blockdev", "null-co,node-name=n0",
                         "--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "m",
                         "--pidfile", str(pidfile)])
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    pid = int(pidfile.read_text())  # written before the parent returned
    try:
        replies = _qmp(str(sock), {"execute": "qmp_capabilities"}, {"execute": "query-named-block-nodes"})
        assert [n["node-name"] for n in replies[2]["return"]] == ["n0"]
        _qmp(str(sock), {"execute": "qmp_capabilities"}, {"execute": "quit"})
        deadline = time.monotonic() + 20
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not pidfile.exists()
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_daemonize_removes_a_relative_nbd_socket_at_exit(tmp_path: Path) -> None:
    """--daemonize moves to "/": the --nbd-server socket path was made absolute when it was bound."""
    sock, pidfile = tmp_path / "d.sock", tmp_path / "d.pid"
    r = subprocess.run([*BLOCKGRAPH, "--daemonize", "--blockdev", "null-co,node-name=n0",
                        "--nbd-server", "addr.type=unix,addr.path=rel.sock",
                        "--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "m",
                        "--pidfile", str(pidfile)], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    try:
        assert (tmp_path / "rel.sock").exists()
        _qmp(str(sock), {"execute": "qmp_capabilities"}, {"execute": "quit"})
        deadline = time.monotonic() + 20
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not pidfile.exists()
        deadline = time.monotonic() + 20
        while (tmp_path / "rel.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not (tmp_path / "rel.sock").exists()
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_daemonize_failure_makes_the_parent_fail(tmp_path: Path) -> None:
    r = run(BLOCKGRAPH, ["--daemonize", "--blockdev", "driver=file,filename=/nonexistent/x,node-name=x"])
    assert r.returncode == 1
    assert message(r.stderr).endswith("Could not open '/nonexistent/x': No such file or directory")


def test_drive_if_none_is_a_named_backend(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(b"\0" * 65536)
    with ServeProcess(tmp_path, ["--drive", f"if=none,id=drv0,file={img},format=raw,cache=none,readonly=on"]) as d:
        replies = _qmp(d.socket, {"execute": "qmp_capabilities"}, {"execute": "query-block"})
        assert d.stop() == 0
    [block] = replies[2]["return"]
    ins = block["inserted"]
    assert block["device"] == "drv0"
    assert (ins["drv"], ins["file"], ins["ro"]) == ("raw", str(img), True)
    assert ins["cache"] == {"writeback": True, "direct": True, "no-flush": False}


def test_bad_drive_options_are_refused_by_name() -> None:
    r = run(BLOCKGRAPH, ["--drive", "if=none,id=x,file=/dev/null,format=raw,bogus=1"])
    assert r.returncode == 1
    assert message(r.stderr).startswith("--drive if=none,id=x,file=/dev/null,format=raw,bogus=1: ")
    assert "bogus" in message(r.stderr)


def test_stdio_monitor(tmp_path: Path) -> None:
    p = subprocess.Popen([*BLOCKGRAPH, "--chardev", "stdio,id=s", "--monitor", "chardev=s",
                          "--blockdev", "null-co,node-name=n0"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None
    greeting = json.loads(p.stdout.readline())
    for cmd in ({"execute": "qmp_capabilities"}, {"execute": "query-named-block-nodes", "id": 1},
                {"execute": "quit"}):
        p.stdin.write(json.dumps(cmd).encode() + b"\n")
        p.stdin.flush()
    replies = [json.loads(p.stdout.readline()) for _ in range(3)]
    assert p.wait(timeout=30) == 0
    assert "QMP" in greeting
    assert replies[0] == {"return": {}} and replies[1]["return"][0]["node-name"] == "n0"
    assert replies[2] == {"return": {}}


def test_tcp_monitor(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ServeProcess(tmp_path, ["--chardev", f"socket,id=t,host=127.0.0.1,port={port},server=on,wait=off",
                                 "--monitor", "t"]) as d:
        c = socket.create_connection(("127.0.0.1", port), timeout=20)
        f = c.makefile("rwb")
        assert "QMP" in json.loads(f.readline())
        f.write(b'{"execute": "qmp_capabilities"}\n')
        f.flush()
        assert json.loads(f.readline()) == {"return": {}}
        c.close()
        assert d.stop() == 0


def test_wait_on_holds_start_up_until_a_client_connects(tmp_path: Path) -> None:
    sock, pidfile = tmp_path / "w.sock", tmp_path / "w.pid"
    p = subprocess.Popen([*BLOCKGRAPH, "--chardev", f"socket,id=w,path={sock},server=on", "--monitor", "w",
                          "--pidfile", str(pidfile)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr is not None
        line = p.stderr.readline()  # printed once listening, before waiting
        assert line.strip() == f"blockgraph serve: info: waiting for connection on: disconnected:unix:{sock},server=on"
        assert not pidfile.exists()  # start-up is not finished before a client comes
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(sock))
        f = c.makefile("rb")
        assert "QMP" in json.loads(f.readline())
        deadline = time.monotonic() + 30
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pidfile.exists()
        c.close()
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0


def test_writes_through_a_drive_by_name_reach_the_image(tmp_path: Path) -> None:
    img = tmp_path / "rw.raw"
    img.write_bytes(b"\0" * 131072)
    with ServeProcess(tmp_path, ["--drive", f"if=none,id=drv0,file={img},format=raw"]) as d:
        replies = _qmp(d.socket, {"execute": "qmp_capabilities"},
                       {"execute": "human-monitor-command",
                        "arguments": {"command-line": 'qemu-io drv0 "write -P 0x3c 4096 8192"'}})
        assert d.stop() == 0
    assert replies[2]["return"].startswith("wrote 8192/8192 bytes at offset 4096")
    assert img.read_bytes()[4096:12288] == b"\x3c" * 8192


def test_object_throttle_group_from_the_command_line_is_listed(tmp_path: Path) -> None:
    with ServeProcess(tmp_path, ["--object", "throttle-group,id=tg0,x-bps-total=1048576",
                                 "--object", '{"qom-type": "throttle-group", "id": "tg1", "limits": {"iops-total": 9}}'
                                 ]) as d:
        replies = _qmp(d.socket, {"execute": "qmp_capabilities"},
                       {"execute": "qom-list", "arguments": {"path": "/objects"}})
        assert d.stop() == 0
    listed = {p["name"]: p["type"] for p in replies[2]["return"]}
    assert listed["tg0"] == listed["tg1"] == "child<throttle-group>"


def test_export_and_nbd_server_without_the_nbd_plugin_name_it() -> None:
    for args in (["--blockdev", "null-co,node-name=n", "--export", "type=nbd,id=e,node-name=n"],
                 ["--nbd-server", "addr.type=unix,addr.path=/tmp/blockgraph-never-nbd.sock"]):
        r = subprocess.run([*BLOCKGRAPH[:-1], "-p", "no:nbd", "serve", *args], capture_output=True, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
        assert r.returncode == 1
        assert "provided by blockgraph-nbd, which is not installed" in r.stderr


def test_snapshot_sync_without_qcow2_names_its_distribution(tmp_path: Path) -> None:
    img = tmp_path / "b.raw"
    img.write_bytes(b"\0" * 65536)
    sock, pidfile = tmp_path / "n.sock", tmp_path / "n.pid"
    p = subprocess.Popen([*BLOCKGRAPH[:-1], "-p", "no:qcow2", "serve", "--blockdev",
                          f"driver=file,filename={img},node-name=f", "--chardev",
                          f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "m", "--pidfile", str(pidfile)],
                         stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not pidfile.exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.02)
        replies = _qmp(str(sock), {"execute": "qmp_capabilities"},
                       {"execute": "blockdev-snapshot-sync",
                        "arguments": {"node-name": "f", "snapshot-file": str(tmp_path / "o.qcow2"),
                                      "snapshot-node-name": "o"}})
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
    assert "blockgraph-qcow2, which is not installed" in replies[2]["error"]["desc"]
    assert not (tmp_path / "o.qcow2").exists()
