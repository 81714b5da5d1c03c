"""``img snapshot [-l | -a NAME | -c NAME | -d NAME]``: internal snapshots through the driver's hooks.

The hooks (``snapshot_create/goto/delete/list``, see :mod:`blockgraph.driver`)
are found on the image's node or, through filters, below it. The ``-l`` table
and every error line are qemu-img 7.2's.
"""

from __future__ import annotations

import errno
import inspect
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from ..driver import SnapshotInfo
from ..errors import BlockGraphError
from .img_opts import CommonFlags, Getopt, ImgExit, shared_long, usage_error
from .img_util import open_backend, run, size_to_str

if TYPE_CHECKING:
    from ..node import Node
    from ..plugins import PluginHost
    from ..session import Session

HEADER = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"


def table_row(sn: SnapshotInfo) -> str:
    """One line of qemu-img 7.2's snapshot table (bdrv_snapshot_dump)."""
    secs = sn.vm_clock_nsec // 1_000_000_000
    clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{sn.vm_clock_nsec // 1_000_000 % 1000:03d}"
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn.date_sec))
    icount = "" if sn.icount is None else str(sn.icount)
    return f"{sn.id:<9} {sn.name:<16} {size_to_str(sn.vm_state_size):>8}{date:>20}{clock:>13}{icount:>11}"


def table(snapshots: list[SnapshotInfo]) -> list[str]:
    return ["Snapshot list:", HEADER, *(table_row(sn) for sn in snapshots)]


def to_qapi(sn: SnapshotInfo) -> dict[str, Any]:
    """SnapshotInfo as ``img info`` reports it (QAPI SnapshotInfo)."""
    out: dict[str, Any] = {"id": sn.id, "name": sn.name, "vm-state-size": sn.vm_state_size,
                           "date-sec": sn.date_sec, "date-nsec": sn.date_nsec,
                           "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
                           "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000}
    if sn.icount is not None:
        out["icount"] = sn.icount
    return out


def snapshot_node(node: Node) -> Node | None:
    """The node that keeps internal snapshots: this one, or the one a filter passes through to."""
    depth = 0
    cur: Node | None = node
    while cur is not None and depth < 64:
        if cur.caps is not None and cur.caps.snapshot:
            return cur
        if cur.kind.value != "filter" or cur.filtered is None:
            return None
        cur = cur.filtered.node
        depth += 1
    return None


async def call(fn: Any, *args: Any) -> Any:
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def list_snapshots(node: Node) -> list[SnapshotInfo]:
    target = snapshot_node(node)
    return list(await call(target.driver.snapshot_list)) if target is not None else []


def find(snapshots: list[SnapshotInfo], name: str) -> SnapshotInfo | None:
    """bdrv_snapshot_find: an ID match first, then a name match."""
    for sn in snapshots:
        if sn.id == name:
            return sn
    for sn in snapshots:
        if sn.name == name:
            return sn
    return None


def _errno_text(e: BlockGraphError) -> str | None:
    err = getattr(e, "errno", None)
    return os.strerror(err) if isinstance(err, int) and err > 0 else None


def main(argv: list[str], host: PluginHost) -> int:
    return run(host, lambda session: _main(session, argv))


async def _main(session: Session, argv: list[str]) -> int:
    opts, rest = Getopt("la:c:d:hqU", shared_long("object", "image-opts", "force-share")).parse(argv)
    action: str | None = None
    name = ""
    common = CommonFlags()
    for key, value in common.own(opts):
        if key in ("l", "a", "c", "d"):
            if action is not None:
                raise usage_error("Cannot mix '-l', '-a', '-c', '-d'")
            action, name = key, value or ""
    if len(rest) != 1:
        raise usage_error("Expecting one image file name")
    blk = await open_backend(session, rest[0], image_opts=common.image_opts, read_only=action == "l",
                             force_share=common.force_share, share_all=False)
    node = blk.node
    target = snapshot_node(node)
    if action == "l":
        snapshots = await list_snapshots(node)
        if snapshots:
            sys.stdout.write("\n".join(table(snapshots)) + "\n")
    elif action == "c":
        if target is None:
            raise ImgExit(f"Could not create snapshot '{name}': -{errno.ENOTSUP} (Operation not supported)")
        now = time.time_ns()
        sn = SnapshotInfo(name=name, date_sec=now // 1_000_000_000, date_nsec=now // 1000 % 1_000_000 * 1000,
                          icount=0)
        try:
            await call(target.driver.snapshot_create, sn)
        except BlockGraphError as e:
            err = getattr(e, "errno", None) or errno.EIO
            raise ImgExit(f"Could not create snapshot '{name}': -{err} ({os.strerror(err)})") from None
    elif action == "a":
        if target is None:
            raise ImgExit(f"Could not apply snapshot '{name}': Block driver does not support snapshots")
        try:
            await call(target.driver.snapshot_goto, name)
        except BlockGraphError as e:
            text = _errno_text(e)
            raise ImgExit(f"Could not apply snapshot '{name}': "
                          + (f"Failed to load snapshot: {text}" if text else str(e))) from None
    elif action == "d":
        sn = find(await list_snapshots(node), name)
        if sn is None or target is None:
            raise ImgExit(f"Could not delete snapshot '{name}': snapshot not found")
        try:
            await call(target.driver.snapshot_delete, sn.id, sn.name)
        except BlockGraphError as e:
            raise ImgExit(f"Could not delete snapshot '{name}': {_errno_text(e) or e}") from None
    # -q: qemu-img snapshot prints nothing else either way
    return 0
