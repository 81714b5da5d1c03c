"""``--drive``: QEMU's -drive, expanded by :mod:`blockgraph.cmdline` into nodes and a named BlockBackend."""

from __future__ import annotations

import sys
from typing import Any

from .argv import PROG


async def add_drive(daemon: Any, text: str) -> Any:
    """Open one drive; ``if=none,id=NAME`` gives the BlockBackend NAME (visible in query-block).

    A drive with a guest interface (``if=ide``...) still gets its backend, under QEMU's default id; there
    is no guest here to attach the device to, which a warning says.
    """
    from ..cmdline import DriveTable, expand_drive, open_drive

    def warn(msg: str) -> None:
        print(f"{PROG}: --drive {text}: {msg}", file=sys.stderr)

    table = daemon.state.setdefault("drive-table", DriveTable())
    exp = expand_drive(text, table, host=daemon.host, warn=warn)
    blk = await open_drive(daemon.session, exp)
    if blk.root is not None:
        from ..perms import Perm

        # No device frontend holds it: like QEMU's device-less backend it takes nothing and keeps no one
        # out (no image lock either), so exports, block_resize, jobs and other drives can use the node.
        blk.set_perm(Perm.NONE, Perm.ALL)
    daemon.watch_backend(blk)
    if exp.device is not None:
        warn(f"warning: no guest to attach the {exp.interface} device to; the drive is BlockBackend '{exp.id}'")
    return blk
