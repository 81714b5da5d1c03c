"""``blockgraph io``: qemu-io's command language on any image.

    blockgraph io [-f fmt] [-r] [-n] [-t cache] [-i aio] [-U] [--image-opts] -c 'cmd' ... file

Commands given with ``-c`` run in order; without ``-c`` they are read from standard input after a
``qemu-io> `` prompt. The exit status is 1 when any command failed, as qemu-io's. Output lines
are qemu-io's, so scripts written for qemu-io work unchanged.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import attrs

from ..errors import BlockGraphError
from ..options import parse_keyval
from ..plugins import PluginHost
from ..session import Session
from . import qio_cmds, qio_misc  # noqa: F401 - importing registers the commands
from .qio_format import CmdError, GetoptError, getopt, split_command
from .qio_help import lookup, usage
from .qio_state import (
    COMMANDS,
    PROG,
    IoState,
    OpenFlags,
    check_aio,
    check_cache,
    check_discard,
    err,
    error_report,
    out,
)

PROMPT = "qemu-io> "
SHORT_OPTS = "hVc:d:f:rsnCmki:t:T:U\x01:\x02"
# long option -> (short equivalent, takes an argument); \x01/\x02 stand for the two without one
LONG_OPTS = {
    "help": ("h", False), "version": ("V", False), "cmd": ("c", True), "format": ("f", True),
    "read-only": ("r", False), "snapshot": ("s", False), "nocache": ("n", False),
    "copy-on-read": ("C", False), "misalign": ("m", False), "native-aio": ("k", False),
    "discard": ("d", True), "cache": ("t", True), "trace": ("T", True), "aio": ("i", True),
    "force-share": ("U", False), "object": ("\x01", True), "image-opts": ("\x02", False),
}
USAGE = """\
Usage: blockgraph io [OPTIONS]... [-c STRING]... [file]
Run qemu-io commands on a disk image (blockgraph's qemu-io)

  --object OBJECTDEF   accepted for compatibility (no object types are needed yet)
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read
  -m, --misalign       misalign allocations for O_DIRECT (accepted, no effect)
  -k, --native-aio     use kernel AIO implementation
                       (Linux only, prefer use of -i)
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -T, --trace PATTERN  accepted for compatibility (use --log-level before 'io')
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See 'blockgraph io -c help' for information on available commands."""


class UsageError(Exception):
    """A bad invocation: the message goes to stderr, the usage text to stdout, exit status 1."""


@attrs.define
class Invocation:
    commands: list[str] = attrs.Factory(list)
    fmt: str | None = None
    image_opts: bool = False
    filename: str | None = None
    flags: dict[str, Any] = attrs.Factory(dict)
    action: str | None = None  # "help" or "version"


def _expand_long(argv: list[str]) -> list[str]:
    """Turn ``--name[=value]`` (or a unique prefix of it) into the short option getopt knows."""
    result: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--":
            result.append(arg)
            result.extend(it)
            break
        if not arg.startswith("--"):
            result.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        matches = [n for n in LONG_OPTS if n == name] or [n for n in LONG_OPTS if n.startswith(name)]
        if not matches:
            raise UsageError(f"{PROG}: unrecognized option '{arg}'")
        if len(matches) > 1:
            raise UsageError(f"{PROG}: option '{arg}' is ambiguous")
        short, takes = LONG_OPTS[matches[0]]
        if takes and not eq:
            value = next(it, None)
            if value is None:
                raise UsageError(f"{PROG}: option '--{matches[0]}' requires an argument")
        elif eq and not takes:
            raise UsageError(f"{PROG}: option '--{matches[0]}' doesn't allow an argument")
        result.extend([f"-{short}", value] if takes else [f"-{short}"])
    return result


def parse_invocation(argv: list[str]) -> Invocation:
    try:
        opts, operands = getopt(_expand_long(argv), SHORT_OPTS, PROG)
    except GetoptError as e:
        raise UsageError(e.message) from None
    inv = Invocation()
    for c, value in opts:
        if c == "h":
            inv.action = "help"
        elif c == "V":
            inv.action = "version"
        elif c == "c":
            inv.commands.append(value)
        elif c == "f":
            inv.fmt = value
        elif c == "r":
            inv.flags["read_only"] = True
        elif c == "s":
            inv.flags["snapshot"] = True
        elif c == "n":
            inv.flags["cache"] = "none"
        elif c == "C":
            inv.flags["copy_on_read"] = True
        elif c == "k":
            inv.flags["aio"] = "native"
        elif c == "d":
            inv.flags["discard"] = check_discard(value)
        elif c == "t":
            check_cache(value)
            inv.flags["cache"] = value
        elif c == "i":
            check_aio(value)
            inv.flags["aio"] = value
        elif c == "U":
            inv.flags["force_share"] = True
        elif c == "\x02":
            inv.image_opts = True
        # -m (misalign), -T (trace) and --object are accepted and have no effect
        if inv.action:
            return inv
    if len(operands) > 1:
        raise UsageError("")
    inv.filename = operands[0] if operands else None
    return inv


# ---------------------------------------------------------------- running commands


async def run_command(st: IoState, line: str) -> None:
    """Run one command line as qemu-io's dispatcher does; a failure marks the whole run failed."""
    words = split_command(line)
    if not words:
        return
    typed, args = words[0], words[1:]
    spec = lookup(typed)
    if spec is None:
        err(f'command "{typed}" not found')
        st.failed = True
        return
    if st.blk is None and not spec.nofile_ok:
        err("no file open, try 'help open'")
        st.failed = True
        return
    n = len(args)
    if n < spec.argmin or (spec.argmax != -1 and n > spec.argmax):
        if spec.argmax == -1:
            expected = f"at least {spec.argmin}"
        elif spec.argmin == spec.argmax:
            expected = f"{spec.argmin}"
        else:
            expected = f"between {spec.argmin} and {spec.argmax}"
        err(f"bad argument count {n} to {typed}, expected {expected} arguments")
        st.failed = True
        return
    if spec.needs_write and not st.writable:
        error_report("Block node is read-only")
        st.failed = True
        return
    try:
        ok = await COMMANDS[spec.name](st, typed, args)
    except GetoptError as e:
        err(e.message or "")
        out(usage(spec))
        ok = False
    except CmdError as e:
        if e.message:
            out(e.message)
        ok = False
    except (BlockGraphError, OSError) as e:
        error_report(str(e))
        ok = False
    if not ok:
        st.failed = True
    sys.stdout.flush()


async def repl(st: IoState) -> None:
    """Read commands from standard input; aio completions print while it waits for the next line."""
    lines = StdinLines()
    while not st.quit:
        sys.stdout.write(PROMPT)
        sys.stdout.flush()
        line = await lines.readline()
        if not line:
            break
        await run_command(st, line)


class StdinLines:
    """Lines of standard input, read without blocking the loop (so aio requests complete and Ctrl-C works
    while waiting) and without a thread (which would keep the process alive until the user pressed Enter)."""

    def __init__(self) -> None:
        self.pending = b""
        self.eof = False

    async def readline(self) -> str:
        stdin = sys.stdin
        try:
            fd = stdin.fileno()
        except (AttributeError, OSError, ValueError):  # an in-memory stream (tests): reading never blocks
            return stdin.readline() if stdin is not None else ""
        while b"\n" not in self.pending and not self.eof:
            await _readable(fd)
            chunk = os.read(fd, 65536)
            self.pending += chunk
            self.eof = not chunk
        line, sep, self.pending = self.pending.partition(b"\n")
        return (line + sep).decode(errors="replace")


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    try:
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    except (OSError, ValueError):  # a regular file: always readable, and epoll refuses it
        return
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def run(inv: Invocation, host: PluginHost) -> int:
    session = Session(plugins=host, warn=err)
    st = IoState(session)
    try:
        if inv.filename is not None:
            flags = OpenFlags(**inv.flags)
            if inv.image_opts:
                if not await st.open(None, parse_keyval(inv.filename), flags):
                    return 1
            elif not await st.open(inv.filename, {"driver": inv.fmt} if inv.fmt else {}, flags):
                return 1
        if inv.commands:
            for line in inv.commands:
                if st.quit:
                    break
                await run_command(st, line)
        else:
            await repl(st)
        await st.close()
    finally:
        try:
            await st.close()
        finally:
            await session.close()
            sys.stdout.flush()
    return 1 if st.failed else 0


def main(argv: list[str], host: PluginHost) -> int:
    try:
        inv = parse_invocation(argv)
    except UsageError as e:
        if str(e):
            err(str(e))
        out(USAGE)
        return 1
    except BlockGraphError as e:
        error_report(str(e))
        return 1
    if inv.action == "help":
        out(USAGE)
        return 0
    if inv.action == "version":
        from importlib.metadata import version

        out(f"blockgraph io {version('blockgraph')} (qemu-io 7.2 command language)")
        return 0
    if inv.fmt is not None and inv.image_opts:
        error_report("--image-opts and -f are mutually exclusive")
        return 1
    try:
        return asyncio.run(run(inv, host))
    except BlockGraphError as e:
        error_report(str(e))
        return 1
