"""The snapshot table's part of ``img check`` (QEMU's qcow2_check_read_snapshot_table and
qcow2_check_fix_snapshot_table).

An image opened in check mode has not read its snapshot table (a broken one must not stop the check), so the
check reads it first, from the header's pointer. With ``-r all`` that read cuts extra data past 1 KiB and drops
the snapshots past the 65536th or past 64 MiB of table; dropping writes the smaller count to the header at once
(the refcount check that follows relies on it and frees what the dropped entries held). The table is
rewritten after the refcount check (fresh clusters, flush, header switch, old table freed), when it had
entries to repair. Lines starting ``qemu-img: `` are QEMU's error_report lines, the others its plain ones.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Any

from blockgraph.driver import CheckFix, CheckResult
from blockgraph.errors import BlockGraphError, BlockIOError, ImageCorrupt

from .constants import MAX_SNAPSHOTS
from .snapshot import SnapshotTableError, read_table

_ENTRY_HEAD = 40  # bytes of an entry before its extra data (QEMU's QCowSnapshotHeader)
_MIN_V3_EXTRA = 16  # vm_state_size_large and disk_size: what every v3 entry must have
_ERR = "qemu-img: "


def _strerror(e: BlockGraphError) -> str:
    """QEMU prints strerror(-ret) here, whatever detail the error carries."""
    err = getattr(e, "errno", None)
    return os.strerror(err) if isinstance(err, int) and err > 0 else str(e)


def _fail(res: CheckResult, err: int, detail: str) -> BlockIOError:
    """The error that stops the check, carrying the lines printed so far (qemu-img prints them first)."""
    e = BlockIOError(err, op="check", detail=detail)
    e.check_messages = list(res.messages)  # type: ignore[attr-defined]
    return e


async def check_read_snapshot_table(drv: Any, res: CheckResult, fix: CheckFix) -> None:
    img = drv.img
    msg = res.messages.append
    repair = bool(fix & CheckFix.ERRORS)
    buf = bytearray(12)
    await img.file.preadv(60, memoryview(buf))
    nb, offset = struct.unpack(">IQ", buf)
    reduced = 0
    if nb > MAX_SNAPSHOTS and repair:
        msg(f"Discarding {nb - MAX_SNAPSHOTS} overhanging snapshots")
        reduced, nb = nb - MAX_SNAPSHOTS, MAX_SNAPSHOTS
    bad = None
    if nb > MAX_SNAPSHOTS:
        bad, err = "snapshot table too large", errno.EFBIG
    elif offset % img.cs or offset > (1 << 63) - 1 - nb * _ENTRY_HEAD:
        bad, err = "snapshot table offset invalid", errno.EINVAL
    if bad is not None:
        res.check_errors += 1
        msg(f"{_ERR}ERROR {bad}")
        if nb > MAX_SNAPSHOTS:
            msg(f"You can force-remove all {nb - MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all")
        _forget(drv)
        raise _fail(res, err, bad)
    try:
        table = await read_table(img, nb, offset, repair, res.messages)
    except SnapshotTableError as e:
        res.check_errors += 1
        msg(f"{_ERR}ERROR failed to read the snapshot table: {e.reason}")
        if e.hint:
            msg(e.hint)
        _forget(drv)
        raise _fail(res, e.errno, e.reason) from None
    except (ImageCorrupt, BlockIOError) as e:
        res.check_errors += 1
        msg(f"{_ERR}ERROR failed to read the snapshot table: {getattr(e, 'what', None) or e}")
        _forget(drv)
        raise _fail(res, getattr(e, "errno", errno.EIO), str(e)) from None
    reduced += table.reduced
    nb = len(table.snaps)
    res.corruptions += reduced + table.extra_dropped
    drv.snapshots, drv.snapshots_size = table.snaps, table.size
    img.h.nb_snapshots, img.h.snapshots_offset = nb, offset
    if reduced:
        try:
            await img.file.pwritev(60, memoryview(struct.pack(">I", nb)))
            await img.file.flush()
        except BlockGraphError as e:
            res.check_errors += 1
            msg(f"ERROR failed to update the snapshot count in the image header: {_strerror(e)}")
            raise _fail(res, getattr(e, "errno", errno.EIO), "failed to update the snapshot count") from None
        res.corruptions_fixed += reduced
        res.corruptions -= reduced
    if img.h.version >= 3:
        for i, sn in enumerate(table.snaps):
            if sn.extra_data_size < _MIN_V3_EXTRA:
                res.corruptions += 1
                msg(f"{'Repairing' if repair else 'ERROR'} snapshot table entry {i} is incomplete")


def _forget(drv: Any) -> None:
    """The table was not read: the check counts no snapshot (QEMU zeroes its in-memory pointer)."""
    drv.snapshots, drv.snapshots_size = [], 0
    drv.img.h.nb_snapshots = drv.img.h.snapshots_offset = 0


async def check_fix_snapshot_table(drv: Any, res: CheckResult, fix: CheckFix) -> None:
    """Rewrite the table read by check_read_snapshot_table when it had entries to repair."""
    if not (res.corruptions and fix & CheckFix.ERRORS):
        return
    try:
        async with drv._discarding_freed():  # the old table, once free (QEMU's QCOW2_DISCARD_SNAPSHOT)
            await drv._write_table(list(drv.snapshots))
            await drv.img.flush_metadata()
            await drv.img.file.flush()
    except BlockGraphError as e:
        res.check_errors += 1
        res.messages.append(f"ERROR failed to update snapshot table: {_strerror(e)}")
        raise _fail(res, getattr(e, "errno", errno.EIO), "failed to update snapshot table") from None
    res.corruptions_fixed += res.corruptions
    res.corruptions = 0


def add_result(out: CheckResult, src: CheckResult) -> None:
    """QEMU's qcow2_add_check_result without the allocation figures."""
    out.corruptions += src.corruptions
    out.leaks += src.leaks
    out.check_errors += src.check_errors
    out.corruptions_fixed += src.corruptions_fixed
    out.leaks_fixed += src.leaks_fixed
