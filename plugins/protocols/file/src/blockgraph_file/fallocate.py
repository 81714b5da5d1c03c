"""fallocate(2) with a mode, which the os module does not offer.

ctypes is loaded on first use: most runs (info, convert of data) never zero or punch holes, and
importing it costs start-up time.
"""

from __future__ import annotations

import os
from collections.abc import Callable

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_fallocate: Callable[[int, int, int, int], int] | None = None


def _load() -> Callable[[int, int, int, int], int]:
    global _fallocate
    if _fallocate is None:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).fallocate  # the C library is already in the process
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
        _fallocate = fn
    return _fallocate


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _load()(fd, mode, offset, length) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def zero_range(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_ZERO_RANGE, offset, length)
