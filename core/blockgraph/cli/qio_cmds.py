"""qemu-io's data commands: read, readv, write, writev, aio_read, aio_write, aio_flush, discard.

Each returns True on success. A CmdError's message goes to stdout (as qemu-io's printf), failed
requests print ``<op> failed: <strerror>``, and the statistics lines follow qemu-io's formats.
aio requests run as their own tasks and report when they complete.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from typing import Any

from ..driver import ReqFlags
from ..errors import BlockGraphError, BlockIOError, ImageCorrupt, NotSupported, PermissionConflict
from .qio_format import (
    PATTERN_READ_FILL,
    PATTERN_WRITE_DEFAULT,
    REQUEST_MAX_BYTES,
    CmdError,
    cvtnum,
    getopt,
    hexdump,
    parse_pattern,
    pattern_mismatch,
    report,
)
from .qio_help import SPECS, usage
from .qio_state import IoState, command, err, error_report, out

SECTOR = 512


def strerror(e: BaseException) -> str:
    """The errno text qemu-io prints after ``read failed:`` and the like."""
    if isinstance(e, BlockIOError):
        return e.strerror
    if isinstance(e, NotSupported):
        return os.strerror(errno.ENOTSUP)
    if isinstance(e, PermissionConflict):
        return os.strerror(errno.EPERM)
    if isinstance(e, ImageCorrupt):
        return os.strerror(errno.EIO)
    if isinstance(e, OSError):
        return e.strerror or os.strerror(e.errno or errno.EIO)
    return str(e)


IO_ERRORS = (BlockGraphError, OSError)


def num(text: str) -> int:
    """A size argument; qemu-io warns (on stderr) about a unit after a hex number."""
    warnings: list[str] = []
    value = cvtnum(text, warnings)
    for w in warnings:
        error_report(f"warning: {w}")
    return value


def sector_aligned(value: int, what: str) -> None:
    if value % SECTOR:
        raise CmdError(f"{value} is not a sector-aligned value for '{what}'")


def iovec_total(lengths: list[str]) -> int:
    """The buffers of readv/writev/aio_*: each at most, and in total at most, the request limit."""
    total = 0
    for text in lengths:
        n = num(text)
        if n > REQUEST_MAX_BYTES:
            raise CmdError(f"Argument '{text}' exceeds maximum size {REQUEST_MAX_BYTES}")
        total += n
        if total > REQUEST_MAX_BYTES:
            raise CmdError(f"The total number of bytes exceed the maximum size {REQUEST_MAX_BYTES}")
    return total


def filled(count: int, pattern: int) -> bytearray:
    return bytearray((pattern,)) * count


def from_file(path: str, count: int) -> bytearray | None:
    """``write -s FILE``: the file's bytes, repeated to fill ``count``; None (after qemu's message) if unusable."""
    try:
        with open(path, "rb") as f:
            data = f.read(count)
    except OSError as e:
        err(f"{path}: {e.strerror}")
        return None
    if not data and count:
        err(f"{path}: file is empty")
        return None
    buf = bytearray(count)
    view = memoryview(buf)
    for pos in range(0, count, len(data) or 1):
        chunk = min(len(data), count - pos)
        view[pos:pos + chunk] = data[:chunk]
    return buf


def _blk(st: IoState) -> Any:
    assert st.blk is not None  # the dispatcher only runs these with an open image
    return st.blk


def finish_read(op: str, buf: bytearray, offset: int, seconds: float, pattern: int | None,
                check: tuple[int, int], quiet: bool, verbose: bool, csv: bool) -> bool:
    """Pattern check, hex dump and statistics after a read; False when the pattern did not match."""
    ok = True
    view = memoryview(buf)
    if pattern is not None:
        start, length = check
        if pattern_mismatch(view[start:start + length], pattern):
            out(f"Pattern verification failed at offset {offset + start}, {length} bytes")
            ok = False
    if quiet:
        return ok
    if verbose:
        out(*hexdump(view, offset))
    out(*report(op, seconds, offset, len(buf), len(buf), 1, csv))
    return ok


# ---------------------------------------------------------------- synchronous commands


@command("read")
async def read_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    opts, operands = getopt(args, "bCl:pP:qs:v", typed)
    vm = csv = quiet = verbose = False
    pattern: int | None = None
    pattern_offset, pattern_len, lflag, sflag = 0, 0, False, False
    for c, value in opts:
        if c == "b":
            vm = True
        elif c == "C":
            csv = True
        elif c == "l":
            lflag, pattern_len = True, num(value)
        elif c == "P":
            pattern = parse_pattern(value)
        elif c == "q":
            quiet = True
        elif c == "s":
            sflag, pattern_offset = True, num(value)
        elif c == "v":
            verbose = True
    if len(operands) != 2:
        raise CmdError(usage(SPECS["read"]))
    offset = num(operands[0])
    count = num(operands[1])
    if count > REQUEST_MAX_BYTES:
        raise CmdError(f"length cannot exceed {REQUEST_MAX_BYTES}, given {operands[1]}")
    if pattern is None and (lflag or sflag):
        raise CmdError(usage(SPECS["read"]))
    if not lflag:
        pattern_len = count - pattern_offset
    if pattern_len < 0 or pattern_offset + pattern_len > count:
        raise CmdError("pattern verification range exceeds end of read data")
    if vm:
        sector_aligned(offset, "offset")
        sector_aligned(count, "count")
    blk = _blk(st)
    buf = filled(count, PATTERN_READ_FILL)
    start = time.perf_counter()
    try:
        if vm:
            await vmstate(blk, "load_vmstate", offset, memoryview(buf))
        else:
            await blk.preadv(offset, memoryview(buf))
    except IO_ERRORS as e:
        out(f"read failed: {strerror(e)}")
        return False
    seconds = time.perf_counter() - start
    return finish_read("read", buf, offset, seconds, pattern, (pattern_offset, pattern_len), quiet, verbose, csv)


async def vmstate(blk: Any, method: str, offset: int, buf: memoryview) -> None:
    """``-b``: the VM state area, which only formats with internal snapshots provide."""
    fn = getattr(blk, method, None)
    if fn is None:
        raise BlockIOError(errno.ENOTSUP)
    await fn(offset, buf)


def _vector_read_args(typed: str, args: list[str], spec: str, optstring: str
                      ) -> tuple[set[str], bytes | None, list[str]]:
    """Options and operands shared by readv and aio_read: ``[-CqvP pattern] offset len [len...]``."""
    opts, operands = getopt(args, optstring, typed)
    pattern = None
    for c, value in opts:
        if c == "P":
            pattern = parse_pattern(value)
    if len(operands) < 2:
        raise CmdError(usage(SPECS[spec]))
    return {c for c, _ in opts}, pattern, operands


async def _readv_and_report(blk: Any, offset: int, buf: bytearray, pattern: Any, flags: set[str]) -> bool:
    """Read into ``buf``, then verify and report as qemu-io's readv does."""
    start = time.perf_counter()
    try:
        await blk.preadv(offset, memoryview(buf))
    except IO_ERRORS as e:
        out(f"readv failed: {strerror(e)}")
        return False
    return finish_read("read", buf, offset, time.perf_counter() - start, pattern, (0, len(buf)),
                       "q" in flags, "v" in flags, "C" in flags)


@command("readv")
async def readv_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    flags, pattern, operands = _vector_read_args(typed, args, "readv", "CP:qv")
    buf = filled(iovec_total(operands[1:]), PATTERN_READ_FILL)
    return await _readv_and_report(_blk(st), num(operands[0]), buf, pattern, flags)


@command("write")
async def write_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    opts, operands = getopt(args, "bcCfnpP:quzs:", typed)
    vm = compress = csv = quiet = zflag = pflag = False
    source: str | None = None
    pattern, flags = PATTERN_WRITE_DEFAULT, ReqFlags.NONE
    for c, value in opts:
        if c == "b":
            vm = True
        elif c == "c":
            compress = True
        elif c == "C":
            csv = True
        elif c == "f":
            flags |= ReqFlags.FUA
        elif c == "n":
            flags |= ReqFlags.NO_FALLBACK
        elif c == "P":
            pflag, pattern = True, parse_pattern(value)
        elif c == "q":
            quiet = True
        elif c == "u":
            flags |= ReqFlags.MAY_UNMAP
        elif c == "z":
            zflag = True
        elif c == "s":
            source = value
    if len(operands) != 2:
        raise CmdError(usage(SPECS["write"]))
    if vm and zflag:
        raise CmdError("-b and -z cannot be specified at the same time")
    if flags & ReqFlags.FUA and (vm or compress):
        raise CmdError("-f and -b or -c cannot be specified at the same time")
    if flags & ReqFlags.NO_FALLBACK and not zflag:
        raise CmdError("-n requires -z to be specified")
    if flags & ReqFlags.MAY_UNMAP and not zflag:
        raise CmdError("-u requires -z to be specified")
    if zflag + pflag + (source is not None) > 1:
        raise CmdError("Only one of -z, -P, and -s can be specified at the same time")
    offset = num(operands[0])
    count = num(operands[1])
    if count > REQUEST_MAX_BYTES and not flags & ReqFlags.NO_FALLBACK:
        raise CmdError(f"length cannot exceed {REQUEST_MAX_BYTES} without -n, given {operands[1]}")
    if vm or compress:
        sector_aligned(offset, "offset")
        sector_aligned(count, "count")
    buf: bytearray | None = None
    if not zflag:
        buf = from_file(source, count) if source is not None else filled(count, pattern)
        if buf is None:
            return False
    blk = _blk(st)
    start = time.perf_counter()
    try:
        if vm:
            await vmstate(blk, "save_vmstate", offset, memoryview(buf))
        elif zflag:
            await blk.pwrite_zeroes(offset, count, flags)
        elif compress:
            fn = getattr(blk, "pwrite_compressed", None)
            if fn is None:
                raise BlockIOError(errno.ENOTSUP)
            await fn(offset, memoryview(buf))
        else:
            await blk.pwritev(offset, memoryview(buf), flags)
    except IO_ERRORS as e:
        out(f"write failed: {strerror(e)}")
        return False
    seconds = time.perf_counter() - start
    if not quiet:
        out(*report("wrote", seconds, offset, count, count, 1, csv))
    return True


@command("writev")
async def writev_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    opts, operands = getopt(args, "CfqP:", typed)
    pattern, flags = PATTERN_WRITE_DEFAULT, ReqFlags.NONE
    csv = quiet = False
    for c, value in opts:
        if c == "C":
            csv = True
        elif c == "f":
            flags |= ReqFlags.FUA
        elif c == "q":
            quiet = True
        elif c == "P":
            pattern = parse_pattern(value)
    if len(operands) < 2:
        raise CmdError(usage(SPECS["writev"]))
    offset = num(operands[0])
    buf = filled(iovec_total(operands[1:]), pattern)
    start = time.perf_counter()
    try:
        await _blk(st).pwritev(offset, memoryview(buf), flags)
    except IO_ERRORS as e:
        out(f"writev failed: {strerror(e)}")
        return False
    seconds = time.perf_counter() - start
    if not quiet:
        out(*report("wrote", seconds, offset, len(buf), len(buf), 1, csv))
    return True


@command("discard")
async def discard_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    opts, operands = getopt(args, "Cq", typed)
    flags = {c for c, _ in opts}
    if len(operands) != 2:
        raise CmdError(usage(SPECS["discard"]))
    offset = num(operands[0])
    count = num(operands[1])
    if count > REQUEST_MAX_BYTES:
        raise CmdError(f"length cannot exceed {REQUEST_MAX_BYTES}, given {operands[1]}")
    start = time.perf_counter()
    try:
        await _blk(st).pdiscard(offset, count)
    except IO_ERRORS as e:
        out(f"discard failed: {strerror(e)}")
        return False
    seconds = time.perf_counter() - start
    if "q" not in flags:
        out(*report("discard", seconds, offset, count, count, 1, "C" in flags))
    return True


# ---------------------------------------------------------------- aio


@command("aio_read")
async def aio_read_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    flags, pattern, operands = _vector_read_args(typed, args, "aio_read", "CP:iqv")
    if "i" in flags:
        out("injecting invalid read request")
        return True
    buf = filled(iovec_total(operands[1:]), PATTERN_READ_FILL)
    await submitted(st, _readv_and_report(_blk(st), num(operands[0]), buf, pattern, flags))
    return True


@command("aio_write")
async def aio_write_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    opts, operands = getopt(args, "CfiqP:uz", typed)
    pattern, rflags = PATTERN_WRITE_DEFAULT, ReqFlags.NONE
    flags = {c for c, _ in opts}
    for c, value in opts:
        if c == "f":
            rflags |= ReqFlags.FUA
        elif c == "u":
            rflags |= ReqFlags.MAY_UNMAP
        elif c == "P":
            pattern = parse_pattern(value)
    if len(operands) < 2:
        raise CmdError(usage(SPECS["aio_write"]))
    if "i" in flags:
        out("injecting invalid write request")
        return True
    if "z" in flags and len(operands) != 2:
        raise CmdError("-z supports only a single length parameter")
    if rflags & ReqFlags.MAY_UNMAP and "z" not in flags:
        raise CmdError("-u requires -z to be specified")
    offset = num(operands[0])
    if "z" in flags:
        count, buf = num(operands[1]), None
    else:
        buf = filled(iovec_total(operands[1:]), pattern)
        count = len(buf)
    blk = _blk(st)

    async def request() -> None:
        start = time.perf_counter()
        try:
            if buf is None:
                await blk.pwrite_zeroes(offset, count, rflags)
            else:
                await blk.pwritev(offset, memoryview(buf), rflags)
        except IO_ERRORS as e:
            out(f"aio_write failed: {strerror(e)}")
            return
        if "q" not in flags:
            out(*report("wrote", time.perf_counter() - start, offset, count, count, 1, "C" in flags))

    await submitted(st, request())
    return True


async def submitted(st: IoState, request: Any) -> None:
    """Start the request and let it run up to its first wait, as qemu-io's submission does."""
    st.start(request)
    await asyncio.sleep(0)


@command("aio_flush")
async def aio_flush_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    await st.drain_aio()
    return True
