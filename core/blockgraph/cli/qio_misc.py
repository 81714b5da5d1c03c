"""qemu-io's other commands: map, alloc, length, info, truncate, flush, sleep, open, close, reopen,
help, quit, abort, sigraise and the breakpoint commands (which need a blkdebug-like driver)."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from .. import io
from ..driver import DriverKind, PreallocMode, Status
from ..errors import BlockGraphError, OptionError
from ..node import Node
from ..options import merge, parse_keyval
from ..perms import Perm
from .common import parse_cache_mode
from .qio_cmds import IO_ERRORS, num, strerror
from .qio_format import CmdError, cvtstr, getopt, strtol
from .qio_help import SPECS, long_help, lookup, oneline, usage
from .qio_state import (
    IoState,
    OpenFlags,
    check_aio,
    check_cache,
    check_discard,
    command,
    error_report,
    out,
)

SECTOR = 512


def _blk(st: IoState) -> Any:
    assert st.blk is not None  # the dispatcher only runs these with an open image
    return st.blk


# ---------------------------------------------------------------- allocation


async def is_allocated(node: Node, offset: int, length: int) -> tuple[bool, int]:
    """Whether the top layer itself holds ``[offset, offset+n)``, and ``n`` (QEMU's bdrv_is_allocated)."""
    st = await io.block_status(node, offset, length, want_zero=False)
    return bool(st.flags & Status.ALLOCATED), st.length


async def allocated_run(node: Node, offset: int, length: int) -> tuple[bool, int]:
    """The longest run from ``offset`` with one allocation state."""
    first, total = await is_allocated(node, offset, length)
    pos, left = offset + total, length - total
    while left > 0 and total:
        state, n = await is_allocated(node, pos, left)
        if state != first or not n:
            break
        total, pos, left = total + n, pos + n, left - n
    return first, total


@command("map")
async def map_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    blk = _blk(st)
    offset, left = 0, blk.getlength()
    while left:
        try:
            allocated, n = await allocated_run(blk.node, offset, left)
        except IO_ERRORS as e:
            error_report(f"Failed to get allocation status: {strerror(e)}")
            return False
        if not n:
            error_report("Unexpected end of image")
            return False
        state = "    allocated" if allocated else "not allocated"
        out(f"{cvtstr(n)} (0x{n:x}) bytes {state} at offset {cvtstr(offset)} (0x{offset:x})")
        offset, left = offset + n, left - n
    return True


@command("alloc")
async def alloc_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    offset = num(args[0])
    count = num(args[1]) if len(args) == 2 else SECTOR
    node = _blk(st).node
    pos, left, allocated = offset, count, 0
    while left:
        try:
            state, n = await is_allocated(node, pos, left)
        except IO_ERRORS as e:
            out(f"is_allocated failed: {strerror(e)}")
            return False
        pos, left = pos + n, left - n
        if state:
            allocated += n
        if not n:  # the end of the image: count only what exists
            count -= left
            left = 0
    out(f"{allocated}/{count} bytes allocated at offset {cvtstr(offset)}")
    return True


# ---------------------------------------------------------------- image facts


@command("length")
async def length_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    out(cvtstr(_blk(st).getlength()))
    return True


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def get_info(node: Node) -> tuple[int, int] | None:
    """(cluster size, VM state offset), or None where QEMU's bdrv_get_info fails (-ENOTSUP)."""
    fn = getattr(node.driver, "get_info", None)
    if fn is not None:
        info = await _maybe_await(fn())
        get = info.get if isinstance(info, dict) else lambda k, d=0: getattr(info, k, d)
        return int(get("cluster_size", 0) or 0), int(get("vm_state_offset", 0) or 0)
    cluster_size = getattr(node.driver, "cluster_size", None)
    if cluster_size:
        return int(cluster_size), 0
    if node.kind is DriverKind.PROTOCOL:
        return 0, 0
    child = node.primary()
    return await get_info(child.node) if child is not None else None


def dump_specific(tree: Any, depth: int = 1) -> Iterator[str]:
    """Format-specific information as qemu prints it: ``key: value``, nested levels indented."""
    pad = "    " * depth
    if isinstance(tree, dict):
        items = list(tree.items())
    else:
        items = [(f"[{i}]", v) for i, v in enumerate(tree)]
    for key, value in items:
        label = str(key).replace("-", " ")
        if isinstance(value, dict | list):
            yield f"{pad}{label}:"
            yield from dump_specific(value, depth + 1)
        else:
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            yield f"{pad}{label}: {text}"


@command("info")
async def info_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    node = _blk(st).node
    out(f"format name: {node.driver_name}")
    if node.kind is DriverKind.PROTOCOL:  # qemu prints the protocol name as a second "format name"
        out(f"format name: {node.driver_name}")
    try:
        info = await get_info(node)
    except IO_ERRORS:
        return False
    if info is None:
        return False
    out(f"cluster size: {cvtstr(info[0])}", f"vm state offset: {cvtstr(info[1])}")
    specific_fn = getattr(node.driver, "info", None)
    specific = await _maybe_await(specific_fn()) if specific_fn is not None else None
    if specific:
        out("Format specific information:")
        out(*dump_specific(specific))
    return True


# ---------------------------------------------------------------- image changes


@command("truncate")
async def truncate_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    opts, operands = getopt(args, "m:", typed)
    prealloc = PreallocMode.OFF
    for _, value in opts:
        try:
            prealloc = PreallocMode(value)
        except ValueError:
            error_report(f"Invalid preallocation mode '{value}'")
            return False
    if not operands:  # words after the size are ignored, as qemu-io does
        raise CmdError(usage(SPECS["truncate"]))
    length = num(operands[0])
    try:
        await _blk(st).truncate(length, exact=False, prealloc=prealloc)
    except IO_ERRORS as e:
        error_report(strerror(e))
        return False
    return True


@command("flush")
async def flush_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    try:
        await _blk(st).flush()
    except IO_ERRORS as e:
        error_report(f"flush failed: {strerror(e)}")
        return False
    return True


@command("sleep")
async def sleep_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    ms = strtol(args[0])
    if ms is None or ms < 0:
        raise CmdError(f"{args[0]} is not a valid number")
    await asyncio.sleep(ms / 1000)  # aio requests keep completing meanwhile
    return True


# ---------------------------------------------------------------- open / close / reopen


@command("open")
async def open_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    opts, operands = getopt(args, "snCro:kt:d:i:U", typed)
    flags: dict[str, Any] = {}
    options: dict[str, Any] = {}
    try:
        for c, value in opts:
            if c == "s":
                flags["snapshot"] = True
            elif c == "n":
                flags["cache"] = "none"
            elif c == "C":
                flags["copy_on_read"] = True
            elif c == "r":
                flags["read_only"] = True
            elif c == "o":
                options = merge(options, parse_keyval(value))
            elif c == "k":
                flags["aio"] = "native"
            elif c == "t":
                check_cache(value)
                flags["cache"] = value
            elif c == "d":
                flags["discard"] = check_discard(value)
            elif c == "i":
                check_aio(value)
                flags["aio"] = value
            elif c == "U":
                flags["force_share"] = True
    except BlockGraphError as e:
        error_report(str(e))
        return False
    if len(operands) > 1:
        raise CmdError(usage(SPECS["open"]))
    return await st.open(operands[0] if operands else None, options, OpenFlags(**flags))


@command("close")
async def close_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    await st.close()
    return True


@command("reopen")
async def reopen_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    """Reopen the image read-only (-r) or read-write (-w), with a new write cache or new mutable options."""
    opts, operands = getopt(args, "c:o:rw", typed)
    read_only: bool | None = None
    cache: dict[str, Any] | None = None
    changes: dict[str, Any] = {}
    for c, value in opts:
        if c in "rw":
            if read_only is not None:
                error_report("Only one -r/-w option may be given")
                return False
            read_only = c == "r"
        elif c == "c":
            try:
                cache = parse_cache_mode(value)
            except BlockGraphError as e:
                error_report(str(e))
                return False
        elif c == "o":
            try:
                changes = merge(changes, parse_keyval(value))
            except BlockGraphError as e:
                error_report(str(e))
                return False
    if operands:
        raise CmdError(usage(SPECS["reopen"]))
    blk = _blk(st)
    node = blk.node
    if cache is not None:
        direct = bool(node.common and node.common.cache_direct)
        if cache["cache_direct"] != direct or cache["no_flush"] != node.no_flush:
            error_report("Cannot change cache.direct or cache.no-flush of an open image")
            return False
        blk.write_cache = cache["write_cache"]
    before = (blk.perm, blk.read_only)
    try:
        if read_only is True and not blk.read_only:
            await blk.drain()
            blk.set_perm(blk.perm & ~(Perm.WRITE | Perm.RESIZE), blk.shared)
            blk.read_only = True
        await st.session.reopen(node, read_only=read_only, options=changes or None)
        if read_only is False and blk.read_only:
            blk.set_perm(blk.perm | Perm.WRITE, blk.shared)
            blk.read_only = False
    except BlockGraphError as e:
        if (blk.perm, blk.read_only) != before:
            blk.set_perm(before[0], blk.shared)
            blk.read_only = before[1]
        error_report(e.reason if isinstance(e, OptionError) else str(e))  # qemu-io's text
        return False
    return True


# ---------------------------------------------------------------- help, quit, process control


@command("help")
async def help_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    if not args:
        out(*(oneline(name, spec) for name, spec in sorted(SPECS.items())))
        out("", "Use 'help commandname' for extended help.")
        return True
    spec = lookup(args[0])
    if spec is None:
        raise CmdError(f"command {args[0]} not found")
    out(oneline(args[0], spec))
    sys.stdout.write(long_help(spec))
    return True


@command("quit")
async def quit_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    st.quit = True
    return True


@command("abort")
async def abort_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    sys.stdout.flush()
    os.abort()


@command("sigraise")
async def sigraise_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    sig = num(args[0])
    if sig > signal.NSIG:
        raise CmdError(f"signal argument '{args[0]}' is too large to be a valid signal")
    sys.stdout.flush()
    if sig:
        signal.raise_signal(sig)
    return True


# ---------------------------------------------------------------- breakpoints (blkdebug)


def _debug_driver(node: Node, method: str) -> Any:
    """The first driver at or below ``node`` that implements ``method`` (a blkdebug-like filter)."""
    if callable(getattr(node.driver, method, None)):
        return node.driver
    for child in node.children.values():
        found = _debug_driver(child.node, method)
        if found is not None:
            return found
    return None


async def _debug(st: IoState, method: str, *args: str) -> bool:
    drv = _debug_driver(_blk(st).node, method)
    if drv is None:
        return False
    await _maybe_await(getattr(drv, method)(*args))
    return True


@command("break")
async def break_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    if not await _debug(st, "debug_breakpoint", args[0], args[1]):
        raise CmdError("Could not set breakpoint: Operation not supported")
    return True


@command("remove_break")
async def remove_break_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    if not await _debug(st, "debug_remove_breakpoint", args[0]):
        raise CmdError(f"Could not remove breakpoint {args[0]}: Operation not supported")
    return True


@command("resume")
async def resume_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    if not await _debug(st, "debug_resume", args[0]):
        raise CmdError("Could not resume request: Operation not supported")
    return True


@command("wait_break")
async def wait_break_cmd(st: IoState, typed: str, args: list[str]) -> bool:
    # qemu-io polls forever when nothing can suspend; failing says why instead of hanging.
    if not await _debug(st, "debug_wait_suspended", args[0]):
        raise CmdError(f"Could not wait for breakpoint {args[0]}: Operation not supported")
    return True
