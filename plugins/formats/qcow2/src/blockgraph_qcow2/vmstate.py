"""The vm-state area: savevm/loadvm bytes stored like guest data past the end of the virtual disk.

As QEMU (qcow2_vm_state_offset): the area starts at the first L1 entry not needed by the disk, i.e. the
virtual size rounded up to what one L2 table covers, so a 64 MiB image with 64 KiB clusters keeps its vm
state at 512 MiB. Writes go through the normal allocating write path (the active L1 table grows when the
state reaches past it); a snapshot created afterwards takes the state with it (``vm_state_size``) and the
active copy is dropped, so loadvm applies the snapshot and then reads the state back from the same place.
"""

from __future__ import annotations

import errno
from typing import Any

from blockgraph.driver import ReqFlags
from blockgraph.errors import BlockIOError

from .constants import ClusterType


def vm_state_offset(img: Any) -> int:
    per_l1 = img.cs * img.l2_entries
    return -(-img.h.size // per_l1) * per_l1


async def _ensure_l1(drv: Any, end: int) -> None:
    from .snapshot import grow_l1

    img = drv.img
    need = -(-end // (img.cs * img.l2_entries))
    if need > len(img.l1):
        async with drv.meta_lock:
            if need > len(img.l1):
                await grow_l1(img, need)


async def save_vmstate(drv: Any, pos: int, buf: memoryview) -> None:
    if drv.img.has_data_file:
        raise BlockIOError(errno.ENOTSUP, op="save_vmstate", detail="vm state is not supported with a data file")
    start = vm_state_offset(drv.img) + pos
    await _ensure_l1(drv, start + len(buf))
    await drv.pwritev(start, buf, ReqFlags.NONE)


async def load_vmstate(drv: Any, pos: int, buf: memoryview) -> None:
    """Read vm-state bytes; what was never written reads as zeros (never from a backing file)."""
    img = drv.img
    offset = vm_state_offset(img) + pos
    done = 0
    while done < len(buf):
        m = await img.lookup(offset + done, len(buf) - done)
        chunk = buf[done:done + m.length]
        if m.type == ClusterType.NORMAL:
            await drv.data.preadv(m.host, chunk)
        elif m.type == ClusterType.COMPRESSED:
            data = await drv._read_compressed(m.host)
            start = (offset + done) & (img.cs - 1)
            chunk[:] = data[start:start + len(chunk)]
        else:
            chunk[:] = bytes(len(chunk))
        done += m.length


async def discard_vmstate(drv: Any, size: int) -> None:
    """Drop the live copy of the vm state that a snapshot just took: its clusters become zero clusters (the
    shared L2 tables are copied first), as QEMU does so that the next snapshot does not copy them again.
    Caller holds meta_lock."""
    start = vm_state_offset(drv.img)
    await drv.discard_clusters(start, start + size, full=False, discard=False, lock_held=True)


class VmstateMixin:
    async def save_vmstate(self, pos: int, buf: memoryview) -> None:
        await save_vmstate(self, pos, buf)

    async def load_vmstate(self, pos: int, buf: memoryview) -> None:
        await load_vmstate(self, pos, buf)
