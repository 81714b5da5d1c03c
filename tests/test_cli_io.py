"""``blockgraph io``: every command, its output lines, its error paths and the exit status.

Most runs go through ``blockgraph.cli.main.main`` in-process on raw images in a temporary directory.
A small recording protocol driver (``rec``) makes what reaches a driver visible: write flags, flushes,
discards, and how many requests are in flight at once (the aio test asserts on that structure, not
on timing). Interactive mode, signals and abort run as real subprocesses.
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
from blockgraph import hookimpl
from blockgraph.cli import qio
from blockgraph.cli.main import main as bg_main
from blockgraph.driver import BlockStatus, Concurrency, DriverKind, PreallocMode, ReqFlags, Status
from blockgraph.options import opt, parse_int, parse_size
from blockgraph.plugins import PluginHost

BLOCKGRAPH = Path(sys.executable).with_name("blockgraph")
SIZE = 4 << 20
TIMING = re.compile(r"^(\d+(?:\.\d+)? (?:bytes|KiB|MiB|GiB)), (\d+) ops; (\d\d\.\d\d sec|\d+:\d\d:\d\d\.\d\d) "
                    r"\(\d+(?:\.\d+)? (?:bytes|KiB|MiB|GiB|TiB|PiB|EiB)/sec and \d+\.\d{4} ops/sec\)$")
CSV = re.compile(r"^(\d+),(\d+),\d+:\d\d:\d\d\.\d\d,\d+\.\d{3},\d+\.\d{3}$")


def cmds(*commands: str) -> list[str]:
    args: list[str] = []
    for c in commands:
        args += ["-c", c]
    return args


def masked(text: str) -> list[str]:
    """Output lines, with each timing line reduced to its size and op count (checked to be well formed)."""
    lines = []
    for line in text.splitlines():
        m = TIMING.match(line)
        if m:
            line = f"<{m.group(1)}, {m.group(2)} ops>"
        elif CSV.match(line):
            line = "<csv {} {}>".format(*CSV.match(line).groups())
        lines.append(line)
    return lines


@pytest.fixture
def img(tmp_path: Path, monkeypatch: Any) -> Path:
    """A 4 MiB raw image named disk.img in the current directory: 64 KiB of 0x5a at 64 KiB, the rest zero."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.seek(64 << 10)
        f.write(b"\x5a" * (64 << 10))
    return path


def run(args: list[str], capsys: Any, monkeypatch: Any | None = None, stdin: str = "",
        host: PluginHost | None = None) -> tuple[int, str, str]:
    capsys.readouterr()
    if monkeypatch is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = qio.main(args, host) if host is not None else bg_main(["io", *args])
    o, e = capsys.readouterr()
    return rc, o, e


# ---------------------------------------------------------------- a recording driver


LOG: list[tuple] = []
PEAK = {"in_flight": 0, "active": 0}


@attrs.frozen(kw_only=True)
class RecOptions:
    size: int = opt(SIZE, converter=parse_size)
    gate: int = opt(0, converter=parse_int)  # hold each read/write until this many are inside the driver
    hole: int = opt(0, converter=parse_size)  # [hole, hole + 64k) is reported unallocated


class RecDriver:
    """A RAM disk that logs every call and can hold requests until several are in flight."""

    name: ClassVar[str] = "rec"
    kind: ClassVar[DriverKind] = DriverKind.PROTOCOL
    api_version: ClassVar[int] = 1
    concurrency: ClassVar[Concurrency] = Concurrency.PARALLEL
    supported_write_flags: ClassVar[ReqFlags] = ReqFlags.NONE
    Options: ClassVar[type] = RecOptions

    async def open(self, node: Any, options: RecOptions) -> None:
        self.node, self.options = node, options
        self.data = bytearray(options.size)
        self.active = 0
        self.arrived = asyncio.Event()
        LOG.append(("open", node.cache_direct, node.no_flush, node.read_only))

    async def close(self) -> None:
        LOG.append(("close",))

    async def getlength(self) -> int:
        return len(self.data)

    async def _enter(self) -> None:
        self.active += 1
        PEAK["active"] = max(PEAK["active"], self.active)
        PEAK["in_flight"] = max(PEAK["in_flight"], self.node.graph_node.in_flight)
        if self.options.gate:
            if self.active >= self.options.gate:
                self.arrived.set()
            try:
                await asyncio.wait_for(self.arrived.wait(), 5)
            except TimeoutError:
                pass  # the peak tells the test that they never were all in flight

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        await self._enter()
        buf[:] = self.data[offset:offset + len(buf)]
        self.active -= 1
        LOG.append(("read", offset, len(buf)))

    async def pwritev(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        await self._enter()
        self.data[offset:offset + len(buf)] = buf
        self.active -= 1
        LOG.append(("write", offset, len(buf), flags))

    async def pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        self.data[offset:offset + length] = bytes(length)
        LOG.append(("zeroes", offset, length, flags))

    async def pdiscard(self, offset: int, length: int) -> None:
        LOG.append(("discard", offset, length))

    async def flush(self) -> None:
        LOG.append(("flush",))

    async def truncate(self, length: int, exact: bool, prealloc: PreallocMode) -> None:
        LOG.append(("truncate", length, exact, prealloc))
        del self.data[length:]
        self.data.extend(bytes(length - len(self.data)))

    async def block_status(self, offset: int, length: int, want_zero: bool) -> BlockStatus:
        hole = self.options.hole
        if hole and hole <= offset < hole + (64 << 10):
            return BlockStatus(Status.NONE, hole + (64 << 10) - offset)
        end = hole if hole and offset < hole else offset + length
        return BlockStatus(Status.DATA | Status.OFFSET_VALID, min(length, end - offset), offset, self.node.graph_node)


class RecPlugin:
    @hookimpl
    def blockgraph_register_drivers(self, register: Any) -> None:
        register(RecDriver, name="rec", kind="protocol")


@pytest.fixture
def rec() -> PluginHost:
    LOG.clear()
    PEAK.update(in_flight=0, active=0)
    return PluginHost(extra=[(RecPlugin(), "rec-test")])


def rec_run(host: PluginHost, capsys: Any, *args: str, opts: str = "", flags: tuple[str, ...] = ()) -> tuple:
    spec = "driver=rec" + (f",{opts}" if opts else "")
    return run([*flags, "--image-opts", *args, spec], capsys, host=host)


def calls(kind: str) -> list[tuple]:
    return [c for c in LOG if c[0] == kind]


# ---------------------------------------------------------------- data commands


def test_write_then_read_back(img: Path, capsys: Any) -> None:
    rc, o, e = run(["-f", "raw", *cmds("write -P 0xab 0 64k", "read -P 0xab 0 64k", "read -P 0x5a 64k 64k"),
                    "disk.img"], capsys)
    assert rc == 0 and e == ""
    assert masked(o) == ["wrote 65536/65536 bytes at offset 0", "<64 KiB, 1 ops>",
                         "read 65536/65536 bytes at offset 0", "<64 KiB, 1 ops>",
                         "read 65536/65536 bytes at offset 65536", "<64 KiB, 1 ops>"]
    assert img.read_bytes()[:64 << 10] == b"\xab" * (64 << 10)


def test_timing_line_shape(img: Path, capsys: Any) -> None:
    rc, o, _ = run(["-f", "raw", "-c", "write 0 64k", "disk.img"], capsys)
    line = o.splitlines()[1]
    assert rc == 0
    assert re.fullmatch(r"64 KiB, 1 ops; \d\d\.\d\d sec \(\d+\.\d{3} (?:KiB|MiB|GiB)/sec and \d+\.\d{4} ops/sec\)",
                        line)


def test_pattern_mismatch_fails_the_run(img: Path, capsys: Any) -> None:
    rc, o, _ = run(["-f", "raw", *cmds("read -P 0xac 64k 4k", "read 0 1"), "disk.img"], capsys)
    assert rc == 1
    assert masked(o) == ["Pattern verification failed at offset 65536, 4096 bytes",
                         "read 4096/4096 bytes at offset 65536", "<4 KiB, 1 ops>",
                         "read 1/1 bytes at offset 0", "<1 bytes, 1 ops>"]


def test_pattern_window(img: Path, capsys: Any) -> None:
    rc, o, _ = run(["-f", "raw", *cmds("read -q -P 0x5a -s 4k -l 4k 60k 12k", "read -q -P 0 -l 4k 60k 12k",
                                       "read -q -P 0 -s 8k 60k 12k", "read -P 0 -s 2k -l 4k 0 4k",
                                       "read -s 1 0 1"), "disk.img"], capsys)
    assert o.splitlines() == ["Pattern verification failed at offset 69632, 4096 bytes",
                              "pattern verification range exceeds end of read data",
                              "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at "
                              "a specified offset"]
    assert rc == 1


def test_write_options(img: Path, capsys: Any) -> None:
    (img.parent / "src.bin").write_bytes(b"abc")
    rc, o, e = run(["-f", "raw", *cmds("write -P 1 0 64k", "write -z 0 4k", "write -zu 8k 4k", "write -q -P 7 16k 1",
                                       "write -C 20k 2", "write -s src.bin 24k 8", "write -f -P 3 32k 1",
                                       "write -p -P 4 33k 1"), "disk.img"], capsys)
    assert rc == 0 and e == ""
    assert masked(o) == ["wrote 65536/65536 bytes at offset 0", "<64 KiB, 1 ops>",
                         "wrote 4096/4096 bytes at offset 0", "<4 KiB, 1 ops>",
                         "wrote 4096/4096 bytes at offset 8192", "<4 KiB, 1 ops>",
                         "<csv 2 1>",
                         "wrote 8/8 bytes at offset 24576", "<8 bytes, 1 ops>",
                         "wrote 1/1 bytes at offset 32768", "<1 bytes, 1 ops>",
                         "wrote 1/1 bytes at offset 33792", "<1 bytes, 1 ops>"]
    data = img.read_bytes()
    assert data[:4096] == bytes(4096) and data[4096:8192] == b"\x01" * 4096
    assert data[8192:12288] == bytes(4096) and data[16384] == 7 and data[20480:20482] == b"\xcd\xcd"
    assert data[24576:24584] == b"abcabcab" and data[32768] == 3 and data[33792] == 4


def test_write_zeroes_unmap_punches_a_hole(img: Path, capsys: Any) -> None:
    run(["-f", "raw", "-c", "write -P 9 1M 1M", "disk.img"], capsys)
    before = os.stat(img).st_blocks
    rc, _, _ = run(["-f", "raw", "-c", "write -zu 1M 1M", "disk.img"], capsys)
    assert rc == 0 and img.read_bytes()[1 << 20:2 << 20] == bytes(1 << 20)
    assert os.stat(img).st_blocks < before


def test_write_argument_errors(img: Path, capsys: Any) -> None:
    checks = {
        "write -z -P 1 0 4k": "Only one of -z, -P, and -s can be specified at the same time",
        "write -u 0 4k": "-u requires -z to be specified",
        "write -n 0 4k": "-n requires -z to be specified",
        "write -b -z 0 1": "-b and -z cannot be specified at the same time",
        "write -f -c 0 1": "-f and -b or -c cannot be specified at the same time",
        "write -b 1 512": "1 is not a sector-aligned value for 'offset'",
        "write -c 0 1": "1 is not a sector-aligned value for 'count'",
        "write -c 0 64k": "write failed: Operation not supported",
        "read -b 0 512": "read failed: Operation not supported",
        "write 0 3G": "length cannot exceed 2147483136 without -n, given 3G",
        "read 0 3G": "length cannot exceed 2147483136, given 3G",
        "write 4M 1": "write failed: Input/output error",
        "read 4M 1": "read failed: Input/output error",
        "read -P 300 0 1": "300 is not a valid pattern byte",
        "read x 1": "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x",
        "read 0 8E": "Parsing error: argument too large -- 8E",
    }
    for command, message in checks.items():
        rc, o, e = run(["-f", "raw", "-c", command, "disk.img"], capsys)
        assert (rc, o.splitlines()[0]) == (1, message), command
    rc, _, e = run(["-f", "raw", "-c", "write -s missing.bin 0 4", "disk.img"], capsys)
    assert rc == 1 and e == "missing.bin: No such file or directory\n"


def test_readv_writev(img: Path, capsys: Any) -> None:
    rc, o, _ = run(["-f", "raw", *cmds("writev -P 0x11 0 1k 2k 512", "readv -P 0x11 0 1k 2k 512",
                                       "readv -v 0 16 4", "readv -P 0x12 0 1k"), "disk.img"], capsys)
    assert rc == 1
    assert masked(o) == [
        "wrote 3584/3584 bytes at offset 0", "<3.500 KiB, 1 ops>",
        "read 3584/3584 bytes at offset 0", "<3.500 KiB, 1 ops>",
        "00000000:  11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11  ................",
        "00000010:  11 11 11 11  ....",
        "read 20/20 bytes at offset 0", "<20 bytes, 1 ops>",
        "Pattern verification failed at offset 0, 1024 bytes",
        "read 1024/1024 bytes at offset 0", "<1 KiB, 1 ops>"]
    rc, o, _ = run(["-f", "raw", *cmds("readv 0 3G", "readv 0 1G 1G 1G"), "disk.img"], capsys)
    assert rc == 1 and o.splitlines() == ["Argument '3G' exceeds maximum size 2147483136",
                                          "The total number of bytes exceed the maximum size 2147483136"]


def test_hexdump_shows_alphanumerics_only(img: Path, capsys: Any) -> None:
    with open(img, "r+b") as f:
        f.seek(1000)
        f.write(b"Hi, you 42!\x00\xff")
    rc, o, _ = run(["-f", "raw", "-c", "read -v 1000 13", "disk.img"], capsys)
    assert rc == 0 and o.splitlines()[0] == "000003e8:  48 69 2c 20 79 6f 75 20 34 32 21 00 ff  Hi..you.42..."


def test_discard_and_errors(img: Path, capsys: Any) -> None:
    rc, o, _ = run(["-f", "raw", *cmds("discard 64k 64k", "discard -q 0 4k", "discard -C 0 4k", "discard 4M 4k",
                                       "read -q -P 0 64k 64k"), "disk.img"], capsys)
    assert rc == 1
    assert masked(o) == ["discard 65536/65536 bytes at offset 65536", "<64 KiB, 1 ops>", "<csv 4096 1>",
                         "discard failed: Input/output error"]
    assert img.read_bytes()[64 << 10:128 << 10] == bytes(64 << 10)


def test_discard_ignore_keeps_data(img: Path, capsys: Any) -> None:
    rc, _, _ = run(["-f", "raw", "-d", "ignore", "-c", "discard 64k 64k", "disk.img"], capsys)
    assert rc == 0 and img.read_bytes()[64 << 10:128 << 10] == b"\x5a" * (64 << 10)


def test_truncate_length_map_alloc_info(img: Path, capsys: Any) -> None:
    rc, o, e = run(["-f", "raw", *cmds("length", "truncate 8M", "length", "truncate -m falloc 9M", "length",
                                       "truncate -m foo 1M", "map", "alloc 0", "alloc 0 5M", "alloc 10M",
                                       "info"), "disk.img"], capsys)
    assert rc == 1 and e == "qemu-io: Invalid preallocation mode 'foo'\n"
    assert o.splitlines() == ["4 MiB", "8 MiB", "9 MiB", "9 MiB (0x900000) bytes     allocated at offset 0 bytes (0x0)",
                              "512/512 bytes allocated at offset 0 bytes",
                              "5242880/5242880 bytes allocated at offset 0 bytes",
                              "0/0 bytes allocated at offset 10 MiB",
                              "format name: raw", "cluster size: 0 bytes", "vm state offset: 0 bytes"]
    assert img.stat().st_size == 9 << 20


def test_info_of_a_protocol_node_prints_the_name_twice(img: Path, capsys: Any) -> None:
    rc, o, _ = run(["-f", "file", "-c", "info", "disk.img"], capsys)
    assert rc == 0 and o.splitlines()[:2] == ["format name: file", "format name: file"]


def test_map_and_alloc_follow_block_status(rec: PluginHost, capsys: Any) -> None:
    rc, o, _ = rec_run(rec, capsys, *cmds("map", "alloc 0 256k", "alloc 64k 64k", "alloc 60k 8k"), opts="hole=128k")
    assert rc == 0
    assert o.splitlines() == [
        "128 KiB (0x20000) bytes     allocated at offset 0 bytes (0x0)",
        "64 KiB (0x10000) bytes not allocated at offset 128 KiB (0x20000)",
        "3.812 MiB (0x3d0000) bytes     allocated at offset 192 KiB (0x30000)",
        "196608/262144 bytes allocated at offset 0 bytes",
        "65536/65536 bytes allocated at offset 64 KiB",
        "8192/8192 bytes allocated at offset 60 KiB"]


# ---------------------------------------------------------------- what reaches the driver


def test_default_cache_is_writethrough(rec: PluginHost, capsys: Any) -> None:
    """qemu-io writes through by default: every write is followed by a flush (FUA emulation)."""
    rc, _, _ = rec_run(rec, capsys, *cmds("write 0 4k", "write 4k 4k"))
    assert rc == 0
    kinds = [c[0] for c in LOG if c[0] in ("write", "flush")]
    assert kinds[:4] == ["write", "flush", "write", "flush"]


def test_writeback_flushes_only_on_request(rec: PluginHost, capsys: Any) -> None:
    rc, _, _ = rec_run(rec, capsys, *cmds("write 0 4k", "write 4k 4k", "write -f 8k 1", "flush"),
                       flags=("-t", "writeback"))
    assert rc == 0
    kinds = [c[0] for c in LOG if c[0] in ("write", "flush")]
    # the FUA write flushes; the explicit flush then finds nothing new (and neither does close)
    assert kinds == ["write", "write", "write", "flush"]


@pytest.mark.parametrize(("flags", "direct", "no_flush"), [
    ((), False, False), (("-n",), True, False), (("-t", "none"), True, False), (("-t", "unsafe"), False, True),
    (("-t", "directsync"), True, False), (("--cache=writeback",), False, False)])
def test_cache_modes_reach_the_node(rec: PluginHost, capsys: Any, flags: tuple, direct: bool, no_flush: bool) -> None:
    rc, _, _ = rec_run(rec, capsys, "-c", "length", flags=flags)
    assert rc == 0 and LOG[0] == ("open", direct, no_flush, False)


def test_zero_and_discard_flags(rec: PluginHost, capsys: Any) -> None:
    rc, _, _ = rec_run(rec, capsys, *cmds("write -z 0 4k", "write -zu 4k 4k", "discard 8k 4k"),
                       flags=("-t", "writeback"))
    assert rc == 0
    zeroes = calls("zeroes")
    assert not zeroes[0][3] & ReqFlags.MAY_UNMAP and zeroes[1][3] & ReqFlags.MAY_UNMAP
    assert calls("discard") == [("discard", 8192, 4096)]
    LOG.clear()
    rc, _, _ = rec_run(rec, capsys, *cmds("write -zu 4k 4k", "discard 8k 4k"), flags=("-d", "ignore"))
    assert rc == 0 and not calls("zeroes")[0][3] & ReqFlags.MAY_UNMAP and calls("discard") == []


def test_truncate_is_not_exact(rec: PluginHost, capsys: Any) -> None:
    rc, o, _ = rec_run(rec, capsys, *cmds("truncate -m full 1M", "length"))
    assert rc == 0 and o == "1 MiB\n" and calls("truncate") == [("truncate", 1 << 20, False, PreallocMode.FULL)]


# ---------------------------------------------------------------- aio


def test_aio_requests_are_in_flight_together(rec: PluginHost, capsys: Any) -> None:
    """Six aio_read requests are all inside the driver before any completes (the gate holds them until
    six have arrived), and aio_flush waits for all of them."""
    reads = [f"aio_read -P 0 {i * 4}k 4k" for i in range(6)]
    rc, o, _ = rec_run(rec, capsys, *cmds(*reads, "aio_flush", "length"), opts="gate=6")
    assert rc == 0
    assert PEAK["active"] == 6 and PEAK["in_flight"] == 6
    lines = masked(o)
    assert sorted(lines[:12:2]) == sorted(f"read 4096/4096 bytes at offset {i * 4096}" for i in range(6))
    assert lines[12:] == ["4 MiB"]  # every completion came before aio_flush returned


def test_aio_writes_concurrent_then_verified(rec: PluginHost, capsys: Any) -> None:
    writes = [f"aio_write -P {i + 1} {i * 4}k 4k" for i in range(4)]
    verify = [f"read -q -P {i + 1} {i * 4}k 4k" for i in range(4)]
    rc, o, _ = rec_run(rec, capsys, *cmds(*writes, "aio_flush", *verify), opts="gate=4", flags=("-t", "writeback"))
    assert rc == 0 and PEAK["active"] == 4
    assert sorted(masked(o)[::2]) == sorted(f"wrote 4096/4096 bytes at offset {i * 4096}" for i in range(4))


def test_aio_on_null_co_with_latency(capsys: Any) -> None:
    """null-co delays every request; eight aio_reads complete and report, and nothing fails."""
    reads = [f"aio_read -P 0 {i}k 1k" for i in range(8)]
    rc, o, e = run(["--image-opts", *cmds(*reads, "aio_flush"), "driver=null-co,latency-ns=20000000,read-zeroes=on"],
                   capsys)
    assert rc == 0 and e == ""
    assert sorted(masked(o)[::2]) == sorted(f"read 1024/1024 bytes at offset {i * 1024}" for i in range(8))


def test_aio_output_and_errors(img: Path, capsys: Any) -> None:
    rc, o, _ = run(["-f", "raw", *cmds("aio_read -P 1 64k 4k", "aio_flush", "aio_read 4M 1", "aio_flush",
                                       "aio_write 4M 1", "aio_flush", "aio_read -i 0 1", "aio_write -i 0 1",
                                       "aio_write -z 0 4k", "aio_read -q 0 1", "aio_read -v 64k 4"), "disk.img"],
                   capsys)
    assert rc == 0  # aio requests succeed once submitted, whatever happens to them
    lines = masked(o)
    assert lines[:6] == ["Pattern verification failed at offset 65536, 4096 bytes",
                         "read 4096/4096 bytes at offset 65536", "<4 KiB, 1 ops>",
                         "readv failed: Input/output error", "aio_write failed: Input/output error",
                         "injecting invalid read request"]
    assert lines[6] == "injecting invalid write request"
    rest = lines[7:]  # completions of requests still in flight at the end (order not fixed)
    assert "wrote 4096/4096 bytes at offset 0" in rest and "00010000:  5a 5a 5a 5a  ZZZZ" in rest
    rc, o, _ = run(["-f", "raw", *cmds("aio_write -zu 0 1 2", "aio_write -u 0 1"), "disk.img"], capsys)
    assert rc == 1 and o.splitlines() == ["-z supports only a single length parameter",
                                          "-u requires -z to be specified"]


# ---------------------------------------------------------------- dispatcher and errors


def test_dispatcher_errors(img: Path, capsys: Any) -> None:
    rc, o, e = run(["-f", "raw", *cmds("foo", "read 0", "map 1", "alloc", "read -Q 0 1", "r 0 1", "read 0 1 -P"),
                    "disk.img"], capsys)
    assert rc == 1
    assert e.splitlines() == ['command "foo" not found', "bad argument count 1 to read, expected at least 2 arguments",
                              "bad argument count 1 to map, expected 0 arguments",
                              "bad argument count 0 to alloc, expected between 1 and 2 arguments",
                              "read: invalid option -- 'Q'", "read: option requires an argument -- 'P'"]
    usage = ("read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset")
    assert masked(o) == [usage, "read 1/1 bytes at offset 0", "<1 bytes, 1 ops>", usage]


def test_read_only_refuses_writes(img: Path, capsys: Any) -> None:
    rc, o, e = run(["-f", "raw", "-r", *cmds("write 0 1", "aio_write 0 1", "writev 0 1", "discard 0 1",
                                             "truncate 0", "flush", "read -q 0 1"), "disk.img"], capsys)
    assert rc == 1 and o == ""
    assert e.splitlines() == ["qemu-io: Block node is read-only"] * 5


def test_no_file_open(capsys: Any) -> None:
    rc, o, e = run(cmds("read 0 1", "close", "sleep 1", "help map"), capsys)
    assert rc == 1 and e.splitlines() == ["no file open, try 'help open'"] * 2
    assert o == "map  -- prints the allocated areas of a file\n"


def test_exit_status_is_zero_when_all_succeed(img: Path, capsys: Any) -> None:
    rc, _, _ = run(["-f", "raw", *cmds("read 0 1", "write 0 1", "help", "sleep 0", "flush"), "disk.img"], capsys)
    assert rc == 0


def test_quit_stops_but_keeps_failures(img: Path, capsys: Any) -> None:
    rc, o, _ = run(["-f", "raw", *cmds("read 4M 1", "quit", "read 0 1"), "disk.img"], capsys)
    assert rc == 1 and o == "read failed: Input/output error\n"
    rc, o, _ = run(["-f", "raw", *cmds("q", "read 0 1"), "disk.img"], capsys)
    assert rc == 0 and o == ""


def test_help(capsys: Any) -> None:
    rc, o, _ = run(["-c", "help"], capsys)
    lines = o.splitlines()
    assert rc == 0 and lines[0] == "abort -- simulate a program crash using abort(3)"
    assert lines[-2:] == ["", "Use 'help commandname' for extended help."] and len(lines) == 28
    rc, o, _ = run(["-c", "help w"], capsys)
    assert o.startswith("w [-bcCfnquz] [-P pattern | -s source_file] off len -- writes") and o.endswith("\n\n")
    rc, o, _ = run(["-c", "help nope"], capsys)
    assert rc == 1 and o == "command nope not found\n"


def test_open_close_commands(img: Path, capsys: Any) -> None:
    rc, o, e = run(cmds("open -o driver=raw disk.img", "read -q -P 0x5a 64k 1", "open disk.img", "close",
                        "open -r -o driver=raw disk.img", "write 0 1", "close", "open -t foo disk.img",
                        "open -o driver=raw,file.filename=disk.img", "read -q -P 0x5a 64k 1", "close",
                        "open -o driver=raw nonexist.img", "open -U -o driver=raw disk.img", "open -C -r disk.img"),
                   capsys)
    assert rc == 1 and o == ""
    assert e.splitlines() == [
        "qemu-io: file open already, try 'help close'", "qemu-io: Block node is read-only",
        "qemu-io: Invalid cache option: foo",
        "qemu-io: can't open device nonexist.img: Could not open 'nonexist.img': No such file or directory",
        "qemu-io: can't open device disk.img: force-share=on can only be used with read-only images",
        "qemu-io: can't open device disk.img: Can't use copy-on-read on read-only device"]


def test_probed_raw_warns_and_protects_sector_zero(img: Path, capsys: Any) -> None:
    from helpers_drivers import TCOW_MAGIC, drivers_plugin

    host = PluginHost(extra=[drivers_plugin()])
    (img.parent / "magic.bin").write_bytes(TCOW_MAGIC)
    rc, o, e = run([*cmds("write -s magic.bin 0 512", "write -P 1 0 512", "write -s magic.bin 512 512"), "disk.img"],
                   capsys, host=host)
    assert rc == 1
    assert e.startswith("WARNING: Image format was not specified for 'disk.img' and probing guessed raw.\n")
    assert masked(o) == ["write failed: Operation not permitted", "wrote 512/512 bytes at offset 0",
                         "<512 bytes, 1 ops>", "wrote 512/512 bytes at offset 512", "<512 bytes, 1 ops>"]


def test_reopen(img: Path, capsys: Any) -> None:
    rc, o, e = run(["-f", "raw", *cmds("reopen -r", "write 0 1", "reopen -w", "write -q 0 1", "reopen -o foo=1",
                                       "reopen -r -w", "reopen -c none", "reopen -c writeback"), "disk.img"], capsys)
    assert rc == 1 and o == ""
    assert e.splitlines() == ["qemu-io: Block node is read-only", "qemu-io: Cannot change the option 'foo'",
                              "qemu-io: Only one -r/-w option may be given",
                              "qemu-io: Cannot change cache.direct or cache.no-flush of an open image"]


def test_breakpoints_need_a_debug_driver(img: Path, capsys: Any) -> None:
    rc, o, _ = run(["-f", "raw", *cmds("break write_aio A", "wait_break A", "resume A", "remove_break A"),
                    "disk.img"], capsys)
    assert rc == 1 and o.splitlines() == ["Could not set breakpoint: Operation not supported",
                                          "Could not wait for breakpoint A: Operation not supported",
                                          "Could not resume request: Operation not supported",
                                          "Could not remove breakpoint A: Operation not supported"]


# ---------------------------------------------------------------- invocation


def test_invocation_errors(img: Path, capsys: Any) -> None:
    cases = {
        ("-f", "raw", "-t", "foo", "disk.img"): "qemu-io: Invalid cache option: foo",
        ("-f", "raw", "-d", "foo", "disk.img"): "qemu-io: Invalid discard option: foo",
        ("-f", "raw", "-i", "foo", "disk.img"): "qemu-io: Invalid aio option: foo",
        ("-f", "raw", "--image-opts", "disk.img"): "qemu-io: --image-opts and -f are mutually exclusive",
        ("-f", "raw", "-U", "disk.img"):
            "qemu-io: can't open device disk.img: force-share=on can only be used with read-only images",
        ("-f", "raw", "-i", "native", "disk.img"):
            "qemu-io: can't open device disk.img: aio=native was specified, but it requires cache.direct=on, "
            "which was not specified.",
    }
    for args, message in cases.items():
        rc, o, e = run(list(args), capsys)
        assert (rc, e.splitlines()[0]) == (1, message), args
    rc, o, e = run(["-Z"], capsys)
    assert rc == 1 and e == "qemu-io: invalid option -- 'Z'\n" and o.startswith("Usage: blockgraph io")
    rc, o, e = run(["--bogus"], capsys)
    assert rc == 1 and e == "qemu-io: unrecognized option '--bogus'\n"
    rc, o, e = run(["disk.img", "disk.img"], capsys)
    assert rc == 1 and o.startswith("Usage: blockgraph io")
    rc, o, _ = run(["-h"], capsys)
    assert rc == 0 and "--image-opts" in o
    rc, o, _ = run(["--version"], capsys)
    assert rc == 0 and o.startswith("blockgraph io ")


def test_image_opts_and_long_options(img: Path, capsys: Any) -> None:
    rc, o, _ = run(["--image-opts", "--cmd=read -q -P 0x5a 64k 1", "--read-o", "--cache", "none",
                    "driver=raw,file.filename=disk.img"], capsys)
    assert rc == 0 and o == ""
    rc, o, _ = run(["--image-opts", "-c", "length", "driver=raw,offset=64k,size=64k,file.filename=disk.img"], capsys)
    assert rc == 0 and o == "64 KiB\n"


# ---------------------------------------------------------------- locking


@pytest.fixture
def foreign_lock(img: Path) -> Any:
    """Another process holding the image as qemu-img does: using read and write, sharing neither write
    nor resize (QEMU's lock bytes 100, 101, 201, 203)."""
    code = ("import fcntl, os, struct, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "for b in (100, 101, 201, 203):\n"
            "    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack('hhqqi4x', fcntl.F_RDLCK, 0, b, 1, 0))\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(img)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline() == "locked\n"
    yield p
    p.stdin.close()
    p.wait(timeout=10)


def test_locked_image_names_force_share(img: Path, foreign_lock: Any, capsys: Any) -> None:
    rc, o, e = run(["-f", "raw", "-c", "read 0 1", "disk.img"], capsys)
    assert rc == 1 and o == ""
    lines = e.splitlines()
    assert lines[0].startswith('qemu-io: can\'t open device disk.img: Failed to get "write" lock')
    assert "Is another process using the image [disk.img]?" in e and "-U" in lines[-1]
    rc, o, _ = run(["-f", "raw", "-r", "-c", "read -q -P 0x5a 64k 1", "disk.img"], capsys)
    assert rc == 0
    rc, o, _ = run(["-f", "raw", "-r", "-U", "-c", "read -q -P 0x5a 64k 1", "disk.img"], capsys)
    assert rc == 0
    rc, o, e = run(["-c", "open -o driver=raw disk.img"], capsys)
    assert rc == 1 and "-U" in e


def test_qemu_io_style_shares_everything(img: Path, capsys: Any) -> None:
    """Two qemu-io-style users (read-write, sharing all) can have one image open at once."""
    fd = os.open(img, os.O_RDWR)
    try:
        for b in (100, 101):  # what a read-write qemu-io holds
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, b, 1, 0))
        rc, _, e = run(["-f", "raw", "-c", "write -q 0 1", "disk.img"], capsys)
    finally:
        os.close(fd)
    assert rc == 0 and e == ""


# ---------------------------------------------------------------- interactive mode and process control


def test_interactive_in_process(img: Path, capsys: Any, monkeypatch: Any) -> None:
    rc, o, e = run(["-f", "raw", "disk.img"], capsys, monkeypatch, stdin="read -P 0x5a 64k 1\n\nfoo\n")
    assert rc == 1 and e == 'command "foo" not found\n'
    assert o.startswith("qemu-io> read 1/1 bytes at offset 65536\n") and o.endswith("\nqemu-io> qemu-io> qemu-io> ")


def _subprocess(args: list[str], cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    def no_core() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return subprocess.run([str(BLOCKGRAPH), "io", *args], cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=60, preexec_fn=no_core)


def test_interactive_subprocess(img: Path) -> None:
    p = _subprocess(["-f", "raw", "disk.img"], img.parent, "write -P 7 0 1\nread -P 7 0 1\nquit\nread 0 1\n")
    assert p.returncode == 0
    assert p.stdout.count("qemu-io> ") == 3 and "wrote 1/1 bytes at offset 0" in p.stdout
    assert p.stdout.endswith(")\nqemu-io> ")  # the last prompt got 'quit'
    assert img.read_bytes()[0] == 7


def test_sigraise_and_abort(img: Path) -> None:
    p = _subprocess(["-f", "raw", *cmds("sigraise 15", "read 0 1"), "disk.img"], img.parent)
    assert p.returncode == -signal.SIGTERM and "read 1/1" not in p.stdout
    p = _subprocess(["-f", "raw", *cmds("abort"), "disk.img"], img.parent)
    assert p.returncode == -signal.SIGABRT
    p = _subprocess(["-f", "raw", *cmds("sigraise 0", "sigraise 100"), "disk.img"], img.parent)
    assert p.returncode == 1 and p.stdout == "signal argument '100' is too large to be a valid signal\n"


def test_sleep_lets_aio_complete_meanwhile(rec: PluginHost, capsys: Any) -> None:
    """A request that needs two arrivals completes once the second one comes, while sleep runs."""
    start = time.monotonic()
    rc, o, _ = rec_run(rec, capsys, *cmds("aio_read 0 1", "sleep 1", "aio_read 4k 1", "aio_flush"), opts="gate=2")
    assert rc == 0 and PEAK["active"] == 2 and len(masked(o)) == 4
    assert time.monotonic() - start < 60  # not a timing assertion: it only guards against a hang


def test_aio_engines_fall_back_to_threads(img: Path, capsys: Any) -> None:
    """-i native / io_uring work whether or not a plugin provides the engine (a warning says when it doesn't)."""
    for flags in (["-n", "-i", "native"], ["-i", "io_uring"], ["-n", "-k"], ["--aio=threads"]):
        rc, o, e = run(["-f", "raw", *flags, "-c", "read -q -P 0x5a 64k 1", "disk.img"], capsys)
        assert rc == 0 and o == "", flags
        assert e == "" or e.endswith("; using aio=threads\n"), flags

