"""QEMU's image locking: one-byte OFD read locks at 100+bit (held) and 200+bit (not shared).

Both sides use the same layout as QEMU's file-posix, so qemu-img, qemu-io and
blockgraph see each other's locks. Byte 0 is left to libvirt's virtlockd.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from blockgraph.errors import ImageLocked
from blockgraph.perms import PERM_BITS, PERM_NAMES, Perm

PERM_BASE, SHARED_BASE = 100, 200
_FLOCK = "hhqqi4x"  # struct flock on Linux x86-64/aarch64: type, whence, start, len, pid


def _flock(fd: int, cmd: int, ltype: int, start: int) -> int:
    arg = struct.pack(_FLOCK, ltype, os.SEEK_SET, start, 1, 0)
    res = fcntl.fcntl(fd, cmd, arg)
    return struct.unpack(_FLOCK, res)[0]


def set_byte(fd: int, byte: int, locked: bool) -> None:
    _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK if locked else fcntl.F_UNLCK, byte)


def held_by_other(fd: int, byte: int) -> bool:
    """Would an exclusive lock on ``byte`` conflict, i.e. does another open file hold it?"""
    return _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def apply(fd: int, perm: int, shared: int, old_perm: int, old_shared: int) -> None:
    """Lock exactly the bytes for (perm, shared), touching only the ones that change."""
    for bit in PERM_BITS:
        idx = bit.bit_length() - 1
        if bool(perm & bit) != bool(old_perm & bit):
            set_byte(fd, PERM_BASE + idx, bool(perm & bit))
        if bool(shared & bit) != bool(old_shared & bit):
            set_byte(fd, SHARED_BASE + idx, not shared & bit)


def check(fd: int, perm: int, shared: int, filename: str) -> None:
    """Refuse when another process unshares what we want, or uses what we unshare (raw_check_lock_bytes).

    Every wanted permission is tested before any unshared one, and the texts are QEMU's, so that
    tools print the same two lines as qemu-img and qemu-io.
    """
    for bit in PERM_BITS:
        if perm & bit and held_by_other(fd, SHARED_BASE + bit.bit_length() - 1):
            raise ImageLocked(f"Failed to get \"{PERM_NAMES[bit]}\" lock\n{_hint(filename)}")
    for bit in PERM_BITS:
        if not shared & bit and held_by_other(fd, PERM_BASE + bit.bit_length() - 1):
            raise ImageLocked(f"Failed to get shared \"{PERM_NAMES[bit]}\" lock\n{_hint(filename)}")


def _hint(filename: str) -> str:
    return f"Is another process using the image [{filename}]?"


def supported(fd: int) -> bool:
    try:
        held_by_other(fd, PERM_BASE)
        return True
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTSUP, errno.ENOLCK):
            return False
        raise


__all__ = ["Perm", "apply", "check", "supported"]
