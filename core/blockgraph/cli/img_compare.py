"""``img compare``: are two images' guest-visible contents the same?

Exit status as qemu-img: 0 identical, 1 different, 2 an image could not be
opened, 3 block status failed, 4 a read failed. Ranges both images report as
zero are not read; an unallocated range counts as equal to one that reads as
zeros (``-s`` makes any block status difference, and a size difference, fail).
A size difference is allowed when the longer image's tail reads as zeros.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..driver import Status
from ..errors import BlockGraphError
from .img_opts import CommonFlags, Getopt, ImgExit, expect, shared_long
from .img_util import Progress, cache_mode, f32, open_backend, qprint, run

if TYPE_CHECKING:
    from ..backend import BlockBackend
    from ..plugins import PluginHost
    from ..session import Session

IO_BUF_SIZE = 2 << 20
SECTOR = 512


def first_nonzero_sector(buf: bytearray | bytes, n: int) -> int:
    """Offset of the first 512-byte sector of ``buf[:n]`` holding a non-zero byte, or -1."""
    data = bytes(memoryview(buf)[:n])
    stripped = data.lstrip(b"\0")
    if not stripped:
        return -1
    return (n - len(stripped)) // SECTOR * SECTOR


def first_difference(a: bytearray, b: bytearray, n: int) -> int:
    """Offset of the first differing 512-byte sector of ``a[:n]`` and ``b[:n]``, or -1."""
    if n == len(a) == len(b):
        if a == b:
            return -1
    elif a[:n] == b[:n]:
        return -1
    lo, hi = 0, n  # invariant: the first difference lies in [lo, hi)
    while hi - lo > SECTOR:
        mid = lo + max(SECTOR, (hi - lo) // 2 // SECTOR * SECTOR)
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Comparer:
    def __init__(self, blk1: BlockBackend, blk2: BlockBackend, name1: str, name2: str, quiet: bool,
                 progress: Progress) -> None:
        self.blks, self.names = (blk1, blk2), (name1, name2)
        self.quiet, self.progress = quiet, progress
        self.buf1, self.buf2 = bytearray(IO_BUF_SIZE), bytearray(IO_BUF_SIZE)

    async def status(self, i: int, offset: int, length: int) -> tuple[Status, int]:
        try:
            st, _ = await self.blks[i].block_status(offset, length)
        except BlockGraphError:
            raise ImgExit(f"Sector allocation test failed for {self.names[i]}", 3) from None
        return st.flags, st.length

    async def read(self, i: int, offset: int, buf: bytearray, n: int) -> None:
        try:
            await self.blks[i].preadv(offset, memoryview(buf)[:n])
        except BlockGraphError as e:
            reason = getattr(e, "strerror", str(e))
            raise ImgExit(f"Error while reading offset {offset} of {self.names[i]}: {reason}", 4) from None

    async def check_empty(self, i: int, offset: int, n: int) -> bool:
        await self.read(i, offset, self.buf1, n)
        idx = first_nonzero_sector(self.buf1, n)
        if idx >= 0:
            qprint(self.quiet, f"Content mismatch at offset {offset + idx}!")
            return False
        return True

    def step(self, chunk: int, base: int) -> None:
        self.progress.print(f32(f32(f32(chunk) / f32(base)) * 100), 100)

    async def compare(self, strict: bool) -> int:
        size1, size2 = self.blks[0].getlength(), self.blks[1].getlength()
        total, base = min(size1, size2), max(size1, size2)
        self.progress.print(0, 100)
        if strict and size1 != size2:
            qprint(self.quiet, "Strict mode: Image size mismatch!")
            return 1
        offset = 0
        while offset < total:
            st1, n1 = await self.status(0, offset, size1 - offset)
            st2, n2 = await self.status(1, offset, size2 - offset)
            alloc1, alloc2 = bool(st1 & Status.ALLOCATED), bool(st2 & Status.ALLOCATED)
            chunk = min(n1, n2)
            if strict and st1 != st2:
                qprint(self.quiet, f"Strict mode: Offset {offset} block status mismatch!")
                return 1
            if st1 & Status.ZERO and st2 & Status.ZERO:
                pass
            elif alloc1 == alloc2:
                if alloc1:
                    chunk = min(chunk, IO_BUF_SIZE)
                    await self.read(0, offset, self.buf1, chunk)
                    await self.read(1, offset, self.buf2, chunk)
                    idx = first_difference(self.buf1, self.buf2, chunk)
                    if idx >= 0:
                        qprint(self.quiet, f"Content mismatch at offset {offset + idx}!")
                        return 1
            else:
                chunk = min(chunk, IO_BUF_SIZE)
                if not await self.check_empty(0 if alloc1 else 1, offset, chunk):
                    return 1
            offset += chunk
            self.step(chunk, base)
        if size1 != size2:
            qprint(self.quiet, "Warning: Image size mismatch!")
            over = 0 if size1 > size2 else 1
            while offset < base:
                st, chunk = await self.status(over, offset, base - offset)
                if st & Status.ALLOCATED and not st & Status.ZERO:
                    chunk = min(chunk, IO_BUF_SIZE)
                    if not await self.check_empty(over, offset, chunk):
                        return 1
                offset += chunk
                self.step(chunk, base)
        qprint(self.quiet, "Images are identical.")
        return 0


def main(argv: list[str], host: PluginHost) -> int:
    return run(host, lambda session: _main(session, argv), error_code=2)


async def _main(session: Session, argv: list[str]) -> int:
    opts, rest = Getopt("hf:F:T:pqsU", shared_long("object", "image-opts", "force-share")).parse(argv)
    fmt1 = fmt2 = None
    cache = "writeback"
    progress = strict = False
    common = CommonFlags(object_code=2)
    for key, value in common.own(opts):
        if key == "f":
            fmt1 = value
        elif key == "F":
            fmt2 = value
        elif key == "T":
            cache = value
        elif key == "p":
            progress = True
        elif key == "s":
            strict = True
    expect(rest, 2, "Expecting two image file names")
    meter = Progress(progress and not common.quiet, 2.0)
    try:
        cache_mode(cache, "Invalid source cache option: {0}")
        blk1 = await open_backend(session, rest[0], fmt=fmt1, image_opts=common.image_opts, cache=cache,
                                  force_share=common.force_share, code=2)
        blk2 = await open_backend(session, rest[1], fmt=fmt2, image_opts=common.image_opts, cache=cache,
                                  force_share=common.force_share, code=2)
        return await Comparer(blk1, blk2, rest[0], rest[1], common.quiet, meter).compare(strict)
    except ImgExit as e:
        if e.code == 1:
            e.code = 2
        raise
    finally:
        meter.end()
