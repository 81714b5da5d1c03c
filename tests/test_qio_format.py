"""qemu-io's number, pattern, option and output formats as ``blockgraph io`` implements them."""

from __future__ import annotations

import errno
import re

import pytest
from blockgraph.cli.qio_format import (
    CmdError,
    GetoptError,
    cvtnum,
    cvtstr,
    getopt,
    hexdump,
    parse_pattern,
    report,
    split_command,
    strtol,
    timestr,
)
from blockgraph.errors import BlockIOError


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("4k", 4096), ("4K", 4096), ("1M", 1 << 20), ("1g", 1 << 30), ("2T", 2 << 40), ("1P", 1 << 50),
    ("7E", 7 << 60), ("0x10", 16), ("0X1b", 27), ("010", 10), ("+1", 1), ("1b", 1), ("1.0", 1), ("1.", 1),
    ("1.5k", 1536), ("1.k", 1024), ("0.0005k", 1), ("0.0004k", 0), ("1.9999k", 2048), ("1.00048828125k", 1025),
    ("3.99999999999999999999k", 3072), ("9223372036854775807", (1 << 63) - 1)])
def test_cvtnum_accepts(text: str, value: int) -> None:
    assert cvtnum(text) == value


@pytest.mark.parametrize(("text", "too_large"), [
    ("x", False), ("-5", False), ("1.5", False), ("1.5b", False), ("1kb", False), (".5k", False), ("0x", False),
    ("0x1.0", False), ("1.5e-1k", False), ("1_0", False), ("8E", True), ("9223372036854775808", True),
    ("99999999999999999999", True), ("0xffffffffffffffff", True)])
def test_cvtnum_refuses(text: str, too_large: bool) -> None:
    with pytest.raises(CmdError) as info:
        cvtnum(text)
    reason = "argument too large" if too_large else "non-numeric argument, or extraneous/unrecognized suffix"
    assert info.value.message == f"Parsing error: {reason} -- {text}"


def test_hex_suffix_warns() -> None:
    warnings: list[str] = []
    assert cvtnum("0x1k", warnings) == 1024
    assert warnings == ["Using a multiplier suffix on hex numbers is deprecated: 0x1k"]


def test_patterns_and_strtol() -> None:
    assert [parse_pattern(t) for t in ("0", "0xab", "255", "010")] == [0, 0xAB, 255, 8]
    for bad in ("256", "-1", "0x", "1k", "x"):
        with pytest.raises(CmdError, match=f"^{re.escape(bad)} is not a valid pattern byte$"):
            parse_pattern(bad)
    assert (strtol("0x10"), strtol("-3"), strtol("08"), strtol("1k")) == (16, -3, None, None)


def test_cvtstr_and_timestr() -> None:
    assert [cvtstr(v) for v in (0, 1, 32, 1000, 1024, 1536, 65536, 63.9375 * 2**20, 2**30, 5.7789)] == [
        "0 bytes", "1 bytes", "32 bytes", "1000 bytes", "1 KiB", "1.500 KiB", "64 KiB", "63.938 MiB", "1 GiB",
        "5.778900 bytes"]
    assert cvtstr(0.0007) == "0 bytes"  # qemu trims at the first ".000", wherever it is
    assert [timestr(t, False) for t in (0.004, 0.5, 1.2, 708.79)] == ["00.00 sec", "00.50 sec", "0:00:01.20",
                                                                      "0:11:48.79"]
    assert timestr(0.004, True) == "0:00:00.00" and timestr(3725.5, False) == "1:02:05.50"


def test_report_lines() -> None:
    assert report("wrote", 0.5, 0, 65536, 65536, 1, False) == [
        "wrote 65536/65536 bytes at offset 0", "64 KiB, 1 ops; 00.50 sec (128 KiB/sec and 2.0000 ops/sec)"]
    assert report("read", 2.0, 7, 4096, 4096, 1, True) == ["4096,1,0:00:02.00,2048.000,0.500"]


def test_hexdump_lines() -> None:
    assert list(hexdump(b"ab\x00" * 6, 0x10)) == [
        "00000010:  61 62 00 61 62 00 61 62 00 61 62 00 61 62 00 61  ab.ab.ab.ab.ab.a",
        "00000020:  62 00  b."]


def test_getopt_permutes_and_stops_at_double_dash() -> None:
    assert getopt(["0", "-vq", "1", "-P0x5", "-l", "4"], "vqP:l:", "read") == (
        [("v", ""), ("q", ""), ("P", "0x5"), ("l", "4")], ["0", "1"])
    assert getopt(["-v", "--", "-5", "-q"], "vq", "read") == ([("v", "")], ["-5", "-q"])
    with pytest.raises(GetoptError, match=r"^read: invalid option -- 'x'$"):
        getopt(["-x"], "v", "read")
    with pytest.raises(GetoptError, match=r"^read: option requires an argument -- 'P'$"):
        getopt(["-P"], "P:", "read")
    assert split_command("  read\t0  1 \n") == ["read\t0", "1"]


def test_strerror_of_core_errors() -> None:
    from blockgraph.cli.qio_cmds import strerror
    from blockgraph.errors import NotSupported

    assert strerror(BlockIOError(errno.EIO)) == "Input/output error"
    assert strerror(BlockIOError(errno.EPERM, detail="Operation not permitted")) == "Operation not permitted"
    assert strerror(NotSupported("x")) == "Operation not supported"
