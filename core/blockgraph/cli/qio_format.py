"""qemu-io's number syntax, argument scanning and output formats, reproduced from its observed behaviour.

Everything here is pure (no I/O): :mod:`blockgraph.cli.qio_cmds` prints what these return.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

REQUEST_MAX_BYTES = 2147483136  # the largest request a BlockBackend accepts (INT_MAX rounded down to 512)
INT64_MAX = (1 << 63) - 1
PATTERN_READ_FILL = 0xAB  # what read buffers hold before the read (visible on drivers that leave them alone)
PATTERN_WRITE_DEFAULT = 0xCD

_MULTIPLIERS = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_DECIMAL = re.compile(r"\+?(\d+)")
_HEX = re.compile(r"\+?0[xX]([0-9a-fA-F]+)")
_FRACTION = re.compile(r"\.(\d*)")
_EXPONENT = re.compile(r"[eE][+-]?\d")
_STRTOL = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)")


class CmdError(Exception):
    """A command cannot go on; ``message`` (if any) goes to stdout, and the command fails."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or "")
        self.message = message


class NumberError(CmdError):
    """A size argument qemu-io would refuse, with qemu-io's message for it."""

    def __init__(self, text: str, too_large: bool) -> None:
        reason = "argument too large" if too_large else "non-numeric argument, or extraneous/unrecognized suffix"
        super().__init__(f"Parsing error: {reason} -- {text}")


def cvtnum(text: str, warn: list[str] | None = None) -> int:
    """A size: decimal or ``0x`` hex, an optional fraction and one of ``bkmgtpe`` (binary units).

    Fractions need a unit other than bytes and round to the nearest byte; the value must fit in a
    signed 64-bit integer. A unit after a hex number works but is deprecated (a warning is appended
    to ``warn``).
    """
    m = _HEX.match(text)
    hex_number = m is not None
    if m is None:
        m = _DECIMAL.match(text)
    if m is None:
        raise NumberError(text, False)
    value = int(m.group(1), 16 if hex_number else 10)
    rest = text[m.end():]
    fraction = ""
    if rest.startswith("."):
        if hex_number:
            raise NumberError(text, False)
        f = _FRACTION.match(rest)
        fraction = f.group(1) if f else ""
        rest = rest[f.end():] if f else rest[1:]
        if fraction and _EXPONENT.match(rest):
            raise NumberError(text, False)
    shift = 0
    if rest:
        unit = rest[0].lower()
        if len(rest) != 1 or unit not in _MULTIPLIERS:
            raise NumberError(text, False)
        shift = _MULTIPLIERS[unit]
        if hex_number and warn is not None:
            warn.append(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
    mul = 1 << shift
    frac = float("0." + fraction) if fraction else 0.0
    if frac and mul == 1:
        raise NumberError(text, False)
    if frac >= 1.0:  # so many nines that the double rounds to 1: qemu drops the fraction
        frac = 0.0
    result = value * mul + math.floor(frac * mul + 0.5)
    if result > INT64_MAX:
        raise NumberError(text, True)
    return result


def strtol(text: str) -> int | None:
    """C's ``strtol(text, &end, 0)`` when the whole string must be a number; None otherwise."""
    m = _STRTOL.fullmatch(text)
    if m is None:
        return None
    digits = m.group(2)
    if digits[:2].lower() == "0x":
        value = int(digits[2:], 16)
    elif digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    return -value if m.group(1) == "-" else value


def parse_pattern(text: str) -> int:
    """A pattern byte (``0xab``, ``171``, ``0253``)."""
    value = strtol(text)
    if value is None or not 0 <= value <= 255:
        raise CmdError(f"{text} is not a valid pattern byte")
    return value


# ---------------------------------------------------------------- output


def cvtstr(value: float) -> str:
    """qemu-io's human size: three decimals in the largest binary unit, ``.000`` trimmed (``64 KiB``)."""
    for shift, unit in ((60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if value >= 1 << shift:
            text, suffix = f"{value / (1 << shift):.3f}", f" {unit}"
            break
    else:
        text, suffix = f"{value:f}", " bytes"
    cut = text.find(".000")
    return (text[:cut] if cut >= 0 else text) + suffix


def timestr(seconds: float, fixed: bool) -> str:
    """``00.01 sec`` under a second, ``h:mm:ss.ss`` from one second on (always in CSV mode)."""
    whole = int(seconds)
    frac = seconds - whole
    if fixed or whole:
        return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60 + frac:05.2f}"
    return f"{frac:05.2f} sec"


def _per_second(value: float, seconds: float) -> float:
    if seconds > 0:
        return value / seconds
    return math.inf if value else math.nan


def report(op: str, seconds: float, offset: int, count: int, total: int, ops: int, csv: bool) -> list[str]:
    """The statistics lines after a request: two human lines, or one CSV line with ``-C``."""
    rate, ops_rate = _per_second(total, seconds), _per_second(ops, seconds)
    if csv:
        return [f"{total},{ops},{timestr(seconds, True)},{rate:.3f},{ops_rate:.3f}"]
    return [f"{op} {count}/{total} bytes at offset {offset}",
            f"{cvtstr(total)}, {ops} ops; {timestr(seconds, False)} ({cvtstr(rate)}/sec and {ops_rate:.4f} ops/sec)"]


def hexdump(buf: memoryview | bytes, offset: int) -> Iterator[str]:
    """``-v``: 16 bytes a line, hex then the alphanumeric characters (others as ``.``)."""
    data = bytes(buf)
    for pos in range(0, len(data), 16):
        chunk = data[pos:pos + 16]
        hexpart = "".join(f"{b:02x} " for b in chunk)
        text = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else "." for b in chunk)
        yield f"{offset + pos:08x}:  {hexpart} {text}"


def pattern_mismatch(buf: memoryview, pattern: int) -> bool:
    """True when ``buf`` is not entirely ``pattern`` (compared as bytes, which is fast)."""
    n = len(buf)
    return n > 0 and bytes(buf) != bytes((pattern,)) * n


# ---------------------------------------------------------------- argument scanning


class GetoptError(CmdError):
    """An unknown option or a missing option argument; the message goes to stderr."""


def getopt(args: list[str], optstring: str, prog: str) -> tuple[list[tuple[str, str]], list[str]]:
    """POSIX-style short options with GNU permutation: options may follow operands; ``--`` ends them.

    Returns (options in order, operands in order). Errors are glibc's texts, prefixed with ``prog``.
    """
    takes_arg = {c: optstring[i + 1:i + 2] == ":" for i, c in enumerate(optstring) if c != ":"}
    opts: list[tuple[str, str]] = []
    operands: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            operands.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        pos = 1
        while pos < len(arg):
            c = arg[pos]
            pos += 1
            if c not in takes_arg:
                raise GetoptError(f"{prog}: invalid option -- '{c}'")
            if not takes_arg[c]:
                opts.append((c, ""))
                continue
            if pos < len(arg):
                opts.append((c, arg[pos:]))
            elif i < len(args):
                opts.append((c, args[i]))
                i += 1
            else:
                raise GetoptError(f"{prog}: option requires an argument -- '{c}'")
            break
    return opts, operands


def split_command(line: str) -> list[str]:
    """Words of a command line: split at spaces only (tabs and quotes are ordinary characters)."""
    return [w for w in line.rstrip("\n").split(" ") if w]
