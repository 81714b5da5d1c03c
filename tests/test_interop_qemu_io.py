"""``blockgraph io`` against the real qemu-io: the same command sequences on the same raw images.

Each case runs once through qemu-io and once through ``blockgraph io``, each on its own copy of one
image (same file name, different directories, so messages that name the file agree). Standard
output must match line for line after masking only the numbers of the timing lines, standard
error and the exit status must match, and the two images must end up byte for byte equal. Images
written by one tool are then read and pattern-verified by the other.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from blockgraph.cli.main import main as bg_main

QEMU_IO = shutil.which("qemu-io")
pytestmark = [pytest.mark.interop, pytest.mark.skipif(not QEMU_IO, reason="qemu-io is not installed")]

IMAGE = "disk.img"
SIZE = 4 << 20
TEXT = b"Hello, World! \x7f\x80abcdefghijklmnopqrstuvwxyz0123456789"

# "64 KiB, 1 ops; 00.00 sec (59.068 MiB/sec and 945.0831 ops/sec)" and "4096,1,0:00:00.00,3.0,7.0"
TIMING = re.compile(r"^(.+, \d+ ops; )(?:\d\d\.\d\d sec|\d+:\d\d:\d\d\.\d\d) \(.+/sec and [\d.]+ ops/sec\)$")
CSV = re.compile(r"^(\d+,\d+),\d+:\d\d:\d\d\.\d\d,[\d.]+,[\d.]+$")


def mask(text: str) -> list[str]:
    """Output lines with the timing lines' time and rates replaced; every other line is kept as is."""
    lines = []
    for line in text.split("\n"):
        line = TIMING.sub(r"\1TIME (RATE/sec and RATE ops/sec)", line)
        line = CSV.sub(r"\1,TIME,RATE,RATE", line)
        lines.append(line)
    return lines


def make_image(path: Path) -> None:
    """A raw image with a few recognisable areas (text, two patterns) and holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.seek(1000)
        f.write(TEXT)
        f.seek(64 << 10)
        f.write(b"\x5a" * (64 << 10))
        f.seek(1 << 20)
        f.write(b"\xa5" * (64 << 10))


def run_qemu(args: list[str], cwd: Path, stdin: str = "") -> tuple[int, str, str]:
    p = subprocess.run([QEMU_IO, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def run_bg(args: list[str], cwd: Path, capsys: Any, monkeypatch: Any, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.chdir(cwd)
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    capsys.readouterr()
    rc = bg_main(["io", *args])
    o, e = capsys.readouterr()
    return rc, o, e


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two directories, each holding the same ``disk.img``: one for qemu-io, one for blockgraph."""
    dirs = []
    for name in ("qemu", "bg"):
        d = tmp_path / name
        d.mkdir()
        make_image(d / IMAGE)
        (d / "pattern.bin").write_bytes(b"blockgraph")
        dirs.append(d)
    return dirs[0], dirs[1]


def compare(pair: tuple[Path, Path], args: list[str], capsys: Any, monkeypatch: Any, *, stdin: str = "",
            stderr: bool = True) -> tuple[int, list[str]]:
    q = run_qemu(args, pair[0], stdin)
    b = run_bg(args, pair[1], capsys, monkeypatch, stdin)
    assert mask(b[1]) == mask(q[1]), f"stdout differs for {args}"
    if stderr:
        assert b[2].splitlines() == q[2].splitlines(), f"stderr differs for {args}"
    assert b[0] == q[0], f"exit status differs for {args}: blockgraph {b[0]}, qemu-io {q[0]}"
    qimg, bimg = pair[0] / IMAGE, pair[1] / IMAGE
    if qimg.exists() and bimg.exists():
        assert bimg.read_bytes() == qimg.read_bytes(), f"images differ after {args}"
    return q[0], mask(q[1])


def cmds(*commands: str) -> list[str]:
    out: list[str] = []
    for c in commands:
        out += ["-c", c]
    return out


CASES: dict[str, list[str]] = {
    "read-write-patterns": cmds(
        "write -P 0xab 0 64k", "read -P 0xab 0 64k", "read -P 0xac 0 4k", "read -v 0 32", "read -C 0 4k",
        "read -P 0x5a 64k 64k", "read -P 0xa5 1M 64k", "read -P 0 2M 1M"),
    "write-flags": cmds(
        "write 0 4k", "write -P 1 4k 4k", "write -z 8k 4k", "write -zu 12k 4k", "write -f -P 2 16k 4k",
        "write -zn 20k 4k", "write -q 0 1", "write -C 0 1", "write -p 24k 1", "write -P 1 -P 2 28k 1",
        "write -zu -C 32k 1", "write -s pattern.bin 36k 25", "read -v 36k 25", "read -P 0xcd 1 4095",
        "read -P 1 4k 4k", "read -P 0 8k 8k", "read -P 2 16k 4k", "write 0 0", "read 4M 0"),
    "pattern-window": cmds(
        "write -P 5 0 4k", "write -P 6 1k 1k", "read -P 5 -l 1k 0 4k", "read -P 6 -s 1k -l 1k 0 4k",
        "read -P 5 -s 2k 0 4k", "read -P 5 -s 1k 0 4k", "read -P 0 -l 8k 0 4k", "read -P 0 -s 2k -l 4k 0 4k",
        "read -P 0 -s 4k 0 4k", "read -s 1 0 1", "read -l 1 0 1", "read -vP0x48 1000 1", "read 1000 2 -v"),
    "hexdump": cmds("read -v 1000 50", "read -v 1003 5", "read -q -v 0 4", "readv -v 1000 3 5",
                    "read -v -C 1000 3", "read -v 0x10000 20"),
    "vectors": cmds(
        "writev -P 0x11 0 1k 2k 512", "readv -P 0x11 0 1k 2k 512", "readv -v 0 16 16", "readv -P 0x12 0 1k 2k",
        "readv -C 0 1 1", "writev -C -q 0 1", "writev -f -P 3 8k 1 2 3", "readv -P 3 8k 6", "readv 0 3G",
        "writev 0 3G", "readv 0 1G 1G 1G", "readv 4M 1", "writev 4M 1", "readv 0 0", "writev 0 0",
        "writev -z 0 1", "readv -s 1 0 1", "writev 0 1 -- 2", "readv x 1"),
    "aio": cmds(
        "aio_write -P 0x22 0 4k", "aio_flush", "aio_write -P 0x23 4k 4k 4k", "aio_flush",
        "aio_read -P 0x22 0 4k", "aio_flush", "aio_read -P 0x24 4k 8k", "aio_flush", "aio_read -v 0 16",
        "aio_flush", "aio_read -C 0 16", "aio_flush", "aio_read -q 0 16", "aio_read 4M 16", "aio_flush",
        "aio_write 4M 1", "aio_flush", "aio_read -i 0 4k", "aio_write -i 0 4k", "aio_write -u 0 1",
        "aio_write -zu 0 1 2", "aio_read 0 3G", "aio_read -P 300 0 1", "aio_read 0 x", "aio_read 0",
        "aio_write -z 16k 4k", "aio_flush", "aio_write -zf 20k 4k", "aio_flush", "aio_write -z 4M 1", "aio_flush",
        "aio_write -P 7 24k 1 2", "aio_flush", "read -P 7 24k 3", "read -P 0 16k 8k", "aio_read 0 0",
        "aio_flush", "aio_write -i -z 0 1 2", "aio_read -i", "aio_write -q 0 1"),
    "parse-errors": cmds(
        "read 4M 4k", "write 4M 4k", "read 0 3G", "write 0 3G", "write -z 0 3G", "read x 4k", "read 0 x",
        "read -P 300 0 4k", "read -P x 0 4k", "read -P -1 0 1", "read -P 0x 0 1", "read -Q 0 1", "read 0",
        "read 0 1 2", "foo", "read 0 99999999999999999999", "read 0 8E", "read 0 7E", "read 0 1.5",
        "read 0 1.5k", "read 0 1.0", "read 0 1.b", "read 0 1.5b", "read 0 0x10", "read 0 010", "read 0 +1",
        "read 0 1kb", "read 0 .5k", "read 0 1.9999k", "read 0 0.0005k", "read 0 1.5e-1k", "read 0 1e",
        "read 0 0x1b", "read 0 0X10", "read -- -5 4k", "read -5 4k", "read 0 1 -P", "read -P", "read 0 -0",
        "read 0 3.99999999999999999999k", "read -P 010 0 1", "read -P 0x5a 64k 1", "read 9223372036854775807 1",
        "read 0 9223372036854775808", "read 5M 0", "write 5M 0", "write -z -P 1 0 4k", "write -u 0 4k",
        "write -n 0 4k", "write -n -u 0 1", "write -u -P 1 0 1", "write -b -z 0 1", "write -f -c 0 1",
        "write -f -b 0 1", "write -b 1 512", "write -b 0 1", "write -c 1 512", "read -b 1 512", "read -b 0 1",
        "write -c 0 64k", "write -b 0 512", "read -b 0 512", "write -s", "write -s pattern.bin -P 1 0 4",
        "write -bz 0 x", "write -zn 4M 1", "write -1 0 4k", "write 0 x", "write -P x 0 4k"),
    "hex-suffix-warning": cmds("read 0 0x1k"),
    "commands-and-aliases": cmds(
        "length", "info", "map", "alloc 0", "alloc 64k 64k", "alloc 4M", "alloc 0 5M", "alloc 1 1", "alloc x",
        "alloc 0 x", "alloc -1", "alloc 0 0", "alloc 5M", "map 0", "length 1", "alloc", "sleep 10", "sleep x",
        "sleep -1", "sleep 1k", "sleep 0x10", "sleep", "sleep 1 2", "flush", "flush 1", "r 0 1", "w 0 1", "l",
        "i", "d 0 1", "a 0", "t 4M", "f", "aio_flush 1", "info 1", "read  0    1", "   read 0 1   ",
        "read\t0 1", "quit 1 2", "read 0 1"),
    "help": cmds("help", "help read", "help r", "help ?", "help i", "help foo", "help read write", "?"),
    "discard-truncate": cmds(
        "discard 0 64k", "discard -C 0 4k", "discard -q 0 4k", "discard 4M 4k", "discard 1 1", "discard 0 3G",
        "discard 0 0", "discard x 1", "discard 0", "discard -Z 0 1", "truncate 8M", "length", "truncate 1M",
        "length", "truncate -m full 2M", "length", "truncate -m falloc 3M", "length", "truncate -m foo 2M",
        "truncate x", "truncate", "truncate 1M 2", "map", "read -P 0 1M 1M"),
    "breakpoints-and-signals": cmds(
        "break write_aio A", "resume A", "remove_break A", "break a", "sigraise x", "sigraise 0",
        "sigraise 1k", "abort 1", "reopen -r -w", "reopen -c foo", "reopen -o foo=bar", "reopen x"),
    "reopen": cmds("reopen -r", "write 0 1", "reopen -w", "write 0 1", "reopen -c writeback", "reopen",
                   "reopen -c writethrough", "write -P 9 1 1", "read -P 9 1 1"),
}
ALL_COMMANDS = ("abort aio_flush aio_read aio_write alloc break close discard flush help info length map open quit "
                "read readv remove_break reopen resume sigraise sleep truncate wait_break write writev").split()
CASES["help-each"] = cmds(*(f"help {c}" for c in ALL_COMMANDS))


@pytest.mark.parametrize("name", list(CASES))
def test_same_output(name: str, pair: tuple[Path, Path], capsys: Any, monkeypatch: Any) -> None:
    _, lines = compare(pair, ["-f", "raw", *CASES[name], IMAGE], capsys, monkeypatch)
    assert len(lines) > 1  # the case printed something to compare


OPTION_CASES: dict[str, list[str]] = {
    "read-only": ["-f", "raw", "-r", *cmds("write 0 1", "aio_write 0 1", "writev 0 1", "write -z 0 1",
                                          "discard 0 1", "truncate 0", "flush", "aio_flush", "read -P 0x5a 64k 4k",
                                          "write x", "write -Q 0 1"), IMAGE],
    "cache-none": ["-f", "raw", "-n", *cmds("write -P 3 0 4k", "read -P 3 0 4k", "read -v 1 3", "write -P 4 5 7",
                                           "read -P 4 5 7", "read -P 3 0 5", "read -P 3 12 500"), IMAGE],
    "copy-on-read": ["-C", "-f", "raw", *cmds("read -P 0x5a 64k 4k", "read 1 3", "write -P 3 5 5", "read -P 3 5 5",
                                              "map"), IMAGE],
    "empty-command": ["-f", "raw", "-c", "", "-c", "length", IMAGE],
    "cache-modes": ["-f", "raw", "-t", "unsafe", *cmds("write -P 8 0 1", "read -P 8 0 1"), IMAGE],
    "cache-directsync": ["--format=raw", "--cache=directsync", *cmds("write -P 8 512 512", "read -P 8 512 512"),
                         IMAGE],
    "long-options": ["--format=raw", "--read-only", "--cache=none", "--aio=threads", "--nocache",
                     "--force-share", "--discard=unmap", "--cmd", "read -P 0x5a 64k 1", IMAGE],
    "discard-ignore": ["-f", "raw", "-d", "ignore", *cmds("discard 64k 64k", "read -P 0x5a 64k 64k"), IMAGE],
    "probed-raw": [*cmds("write -P 0x51 0 512", "read -P 0x51 0 512", "info"), IMAGE],
    "image-opts": ["--image-opts", *cmds("read -P 0x5a 64k 1", "info", "map"), f"driver=raw,file.filename={IMAGE}"],
    "image-opts-probed": ["--image-opts", *cmds("read -P 0x5a 64k 1", "info"), f"file.filename={IMAGE}"],
    "image-opts-file": ["--image-opts", *cmds("info", "write -P 3 0 3", "read -P 3 0 3"),
                        f"driver=file,filename={IMAGE}"],
    "json-filename": [*cmds("read -P 0xa5 1M 1", "info"),
                      "json:" + json.dumps({"driver": "raw", "file": {"driver": "file", "filename": IMAGE}})],
    "raw-window": ["--image-opts", *cmds("read -v 0 16", "length", "write -P 2 0 1", "map", "info"),
                   f"driver=raw,offset=1000,size=64k,file.filename={IMAGE}"],
    "bad-cache": ["-f", "raw", "-t", "foo", IMAGE],
    "bad-discard": ["-f", "raw", "-d", "foo", IMAGE],
    "bad-aio": ["-f", "raw", "-i", "foo", IMAGE],
    "aio-native-needs-direct": ["-f", "raw", "-i", "native", "-c", "read 0 1", IMAGE],
    "format-and-image-opts": ["-f", "raw", "--image-opts", IMAGE],
    "force-share-rw": ["-f", "raw", "-U", "-c", "read 0 1", IMAGE],
    "force-share-ro": ["-f", "raw", "-U", "-r", "-c", "read -P 0x5a 64k 1", IMAGE],
    "missing-file": ["-f", "raw", "-c", "read 0 1", "nonexistent.img"],
    "no-file": cmds("read 0 1", "close", "map", "info", "length", "flush", "aio_flush", "sleep 1", "quit"),
    "no-file-help": cmds("help", "foo", "read 0"),
    "open-close": [*cmds("open -o driver=raw disk.img", "read -P 0x5a 64k 1", "open disk.img", "close", "close",
                         "read 0 1", "open -r -o driver=raw disk.img", "write 0 1", "close", "open -t foo disk.img",
                         "open -d foo disk.img", "open -i foo disk.img", "open -Z disk.img", "open",
                         "open -o driver=raw nonexist.img", "read 0 1", "open -U -o driver=raw disk.img",
                         "open -U -r -o force-share=off disk.img", "open -o driver=raw,driver=raw disk.img",
                         "open -n -o driver=raw disk.img", "write -P 4 4k 4k", "close",
                         "open -t unsafe -d unmap -o driver=raw disk.img", "write -zu 0 4k", "close",
                         "open -o driver=raw,file.filename=disk.img", "read -P 4 4k 4k", "open a b",
                         "close", "open -C -r -o driver=raw disk.img", "read 0 1")],
    "too-many-files": ["-f", "raw", IMAGE, IMAGE],
    "quit-stops": ["-f", "raw", *cmds("read 4M 1", "quit", "read 0 1"), IMAGE],
}


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_same_output_options(name: str, pair: tuple[Path, Path], capsys: Any, monkeypatch: Any) -> None:
    args = OPTION_CASES[name]
    # The usage text names the program; only its first line (and the error before it) must agree.
    if name == "too-many-files":
        q = run_qemu(args, pair[0])
        b = run_bg(args, pair[1], capsys, monkeypatch)
        assert b[0] == q[0] == 1
        assert q[1].startswith("Usage: qemu-io ") and b[1].startswith("Usage: blockgraph io ")
        return
    compare(pair, args, capsys, monkeypatch)


def test_interactive_mode(pair: tuple[Path, Path], capsys: Any, monkeypatch: Any) -> None:
    """Commands from standard input after ``qemu-io> `` prompts; blank lines are skipped; quit ends."""
    script = "read -P 0x5a 64k 4k\n\n   \nwrite -P 1 0 1\nfoo\nread 4M 1\nquit\nread 0 1\n"
    rc, lines = compare(pair, ["-f", "raw", IMAGE], capsys, monkeypatch, stdin=script)
    assert rc == 1 and lines[0].startswith("qemu-io> read 4096/4096")
    rc, lines = compare(pair, ["-f", "raw", IMAGE], capsys, monkeypatch, stdin="read 0 1")
    assert rc == 0 and lines[-1] == "qemu-io> "


# ---------------------------------------------------------------- images written by one, read by the other

WRITES = ["write -P 0x11 0 64k", "write -P 0x22 100k 3k", "writev -P 0x33 1M 1k 2k 512", "write -z 70k 8k",
          "aio_write -P 0x44 2M 64k", "aio_write -P 0x55 3M 1 2 3", "aio_flush", "write -zu 64k 4k",
          "discard 1536k 4k", "write -P 0x66 4194303 1"]
VERIFY = ["read -P 0x11 0 64k", "read -P 0 64k 4k", "read -P 0x5a 68k 2k", "read -P 0 70k 8k",
          "read -P 0x22 100k 3k", "readv -P 0x33 1M 1k 2k 512", "read -P 0xa5 1M+4k 60k".replace("1M+4k", "1052672"),
          "read -P 0x44 2M 64k", "read -P 0x55 3M 6", "read -P 0 1536k 4k", "read -P 0x66 4194303 1",
          "aio_read -P 0x44 2M 32k", "aio_read -P 0x44 2080k 32k", "aio_flush"]


@pytest.mark.parametrize("writer", ["qemu", "blockgraph"])
def test_written_by_one_read_by_other(writer: str, tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    make_image(tmp_path / IMAGE)
    write_args = ["-f", "raw", *cmds(*WRITES), IMAGE]
    verify_args = ["-f", "raw", *cmds(*VERIFY), IMAGE]
    if writer == "qemu":
        rc, o, _ = run_qemu(write_args, tmp_path)
        assert rc == 0, o
        rc, o, e = run_bg(verify_args, tmp_path, capsys, monkeypatch)
    else:
        rc, o, e = run_bg(write_args, tmp_path, capsys, monkeypatch)
        assert rc == 0, o
        rc, o, e = run_qemu(verify_args, tmp_path)
    assert "Pattern verification failed" not in o
    assert rc == 0, o + e
    assert o.count("read ") == len(VERIFY) - 1  # every read reported


def test_locked_image_both_refuse(pair: tuple[Path, Path], capsys: Any, monkeypatch: Any) -> None:
    """An image another process holds (using write, sharing neither write nor resize, as qemu-img does):
    both tools refuse to open it read-write with the same first line, and both read it with -r or -U -r.
    blockgraph adds a line that names -U."""
    code = ("import fcntl, os, struct, sys\n"
            "fds = [os.open(p, os.O_RDWR) for p in sys.argv[1:]]\n"
            "for fd in fds:\n"
            "    for b in (100, 101, 201, 203):\n"
            "        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack('hhqqi4x', fcntl.F_RDLCK, 0, b, 1, 0))\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(pair[0] / IMAGE), str(pair[1] / IMAGE)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        args = ["-f", "raw", "-c", "read -P 0x5a 64k 1", IMAGE]
        q = run_qemu(args, pair[0])
        b = run_bg(args, pair[1], capsys, monkeypatch)
        assert q[0] == b[0] == 1 and q[1] == b[1] == ""
        first = "qemu-io: can't open device disk.img: Failed to get \"write\" lock"
        assert q[2].startswith(first) and b[2].startswith(first)
        assert "Is another process using the image [disk.img]?" in q[2] and "Is another process" in b[2]
        assert "-U" in b[2].splitlines()[-1]
        for extra in (["-r"], ["-r", "-U"]):
            compare(pair, [*extra, *args], capsys, monkeypatch)
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
