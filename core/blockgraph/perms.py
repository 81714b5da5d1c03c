"""Permissions and child roles, with QEMU's bit values and default rules."""

from __future__ import annotations

import enum


class Perm(enum.IntFlag):
    """What a parent does with a child (BLK_PERM_*). Bit 4 stays unused: QEMU < 6.2 locks byte 104/204."""

    NONE = 0
    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08
    ALL = 0x0F


PERM_NAMES = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}
PERM_BITS = tuple(PERM_NAMES)


def perm_names(perm: int) -> str:
    return ", ".join(name for bit, name in PERM_NAMES.items() if perm & bit) or "none"


class ChildRole(enum.IntFlag):
    """How a parent uses a child (BdrvChildRole)."""

    DATA = 0x01
    METADATA = 0x02
    FILTERED = 0x04
    COW = 0x08
    PRIMARY = 0x10
    IMAGE = DATA | METADATA | PRIMARY


def default_child_perm(role: ChildRole, perm: Perm, shared: Perm, writable: bool) -> tuple[Perm, Perm]:
    """What a node asks of and shares on a child, given what its parents ask and share.

    The rules of QEMU's ``bdrv_default_perms``: filtered children pass everything
    through; backing (COW) children only need consistent read; children holding
    metadata never share write or resize, because the parent caches metadata;
    data children never share resize and take it when they are written.
    """
    perm, shared = Perm(perm & Perm.ALL), Perm(shared & Perm.ALL)
    if role & ChildRole.COW:
        want = perm & Perm.CONSISTENT_READ
        share = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
        if shared & Perm.WRITE:
            share |= Perm.WRITE | Perm.RESIZE
        return Perm(want), share
    if role & ChildRole.FILTERED:
        return perm, shared
    if role & ChildRole.METADATA:
        if writable:
            perm |= Perm.WRITE | Perm.RESIZE
        perm |= Perm.CONSISTENT_READ
        shared &= ~(Perm.WRITE | Perm.RESIZE)
    if role & ChildRole.DATA:
        shared &= ~Perm.RESIZE  # the parent may assume the size (metadata, fixed-size extents)
        if perm & Perm.WRITE_UNCHANGED:
            perm |= Perm.WRITE  # copied clusters are real writes on the data file
        if perm & Perm.WRITE:
            perm |= Perm.RESIZE  # writes beyond EOF may grow it
    return Perm(perm), Perm(shared)
