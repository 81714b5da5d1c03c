"""human-monitor-command, for the one HMP command block users script against a daemon: ``qemu-io``.

``qemu-io [-d] DEVICE "COMMAND"`` runs a qemu-io command (blockgraph io's implementation) on a named
BlockBackend or a node, and returns what it printed, as QEMU's monitor does.
"""

from __future__ import annotations

import contextlib
import io as stdio
import shlex
from typing import Any

from .protocol import QMPError
from .registry import command

HMP_HELP = "qemu-io [-d] [device] \"[command]\" -- run a qemu-io command on a block device"


@command("human-monitor-command", {"command-line": "str", "*cpu-index": "int"})
async def human_monitor_command(daemon: Any, args: dict[str, Any]) -> str:
    try:
        words = shlex.split(args["command-line"])
    except ValueError as e:
        raise QMPError(f"Parsing error: {e}") from None
    if not words:
        return ""
    if words[0] == "help":
        return HMP_HELP + "\r\n"
    if words[0] != "qemu-io":
        return f"unknown command: '{words[0]}'\r\n"
    rest = words[1:]
    if rest and rest[0] == "-d":
        rest = rest[1:]
    if len(rest) != 2:
        return "qemu-io: expected a device and one quoted command\r\n"
    return await _qemu_io(daemon, rest[0], rest[1])


async def _qemu_io(daemon: Any, device: str, line: str) -> str:
    from ..backend import BlockBackend
    from ..cli.qio import run_command
    from ..cli.qio_state import IoState
    from ..perms import Perm

    blk = daemon.session.backends.get(device)
    temporary = None
    if blk is None:
        node = daemon.session.nodes.get(device)
        if node is None:
            return f"Device '{device}' not found\r\n"
        temporary = blk = BlockBackend(daemon.session, read_only=node.read_only, share_all=True)
        blk.insert(node)
    state = IoState(daemon.session, blk=blk)
    buf = stdio.StringIO()
    saved = None
    if temporary is None and blk.root is not None and not blk.read_only and not blk.perm & Perm.WRITE:
        # A backend without a device takes no permission; qemu-io writes through it all the same.
        saved = (blk.perm, blk.shared)
        blk.set_perm(blk.perm | Perm.CONSISTENT_READ | Perm.WRITE, blk.shared)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            await run_command(state, line)
            await state.drain_aio()
    finally:
        if temporary is not None:
            await temporary.close()
        if saved is not None and blk.root is not None:
            blk.set_perm(*saved)
    return buf.getvalue().replace("\n", "\r\n")
