"""The copy engine of ``img convert`` (QEMU's convert_do_copy).

One planner walks the sources' block status and hands out chunks: data (at
most one buffer long), zero, or "leave to the backing file". ``-m`` workers
each own one reused buffer; reads of page-cached data complete inline, and
writes are issued in order (unless ``-W``), the next one queued while the
previous one runs. Zero detection runs at C speed:
``bytearray.find`` of a block of zeros skips random data in strides of the
block size, and only aligned all-zero blocks become holes (or write-zeroes
when the target does not start out zeroed). ``-C`` copies data extents with
``copy_file_range`` when both ends are plain files under raw.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from typing import TYPE_CHECKING, Any

import attrs

from ..driver import ReqFlags, Status
from ..errors import BlockGraphError
from .img_opts import ImgExit
from .img_util import Progress, report

if TYPE_CHECKING:
    from ..backend import BlockBackend
    from ..node import Node

SECTOR = 512
BUF_SIZE = 2 << 20
MAX_REQUEST = (1 << 30) - SECTOR * 8
DATA, ZERO, BACKING = "data", "zero", "backing"
WRITE_WINDOW = 2


@attrs.define
class Source:
    blk: Any
    name: str
    start: int  # where this source begins in the concatenated image
    length: int  # its real length in bytes
    span: int  # its length rounded up to whole sectors
    align: int


@attrs.define
class CopyOptions:
    min_sparse: int = 4096  # 0: no zero detection, fully allocate the target
    buf_size: int = BUF_SIZE
    workers: int = 8
    in_order: bool = True
    zero_init: bool = False
    copy_range: bool = False
    salvage: bool = False
    quiet: bool = False
    target_has_backing: bool = False
    target_backing_len: int = -1
    rate_limit: int = 0
    compress_cluster: int = 0  # -c: write whole clusters of this size with WRITE_COMPRESSED


def pow2floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def zero_blocks(buf: bytearray, n: int, gran: int, zeros: bytes, zero_full: bytes = b"") -> list[tuple[int, int]]:
    """Runs ``(start, end)`` of whole ``gran``-aligned all-zero blocks in ``buf[:n]`` (the last may be short).

    Only blocks whose first and last bytes are zero are compared in full; the
    candidates come from two strided slices, so random data costs two C loops
    over ``n / gran`` bytes. ``zero_full`` (``len(buf)`` zeros) catches an
    all-zero buffer with one comparison.
    """
    if n == len(buf) == len(zero_full) and buf.startswith(zeros) and buf == zero_full:
        return [(0, n)]
    firsts = buf[0:n:gran]
    lasts = buf[gran - 1:n:gran]
    runs: list[tuple[int, int]] = []
    count, nlast = len(firsts), len(lasts)
    i = firsts.find(0)
    while i >= 0:
        start = i * gran
        end = min(start + gran, n)
        if (i >= nlast or not lasts[i]) and buf[start:end] == zeros[:end - start]:
            _add(runs, start, end)
        i = firsts.find(0, i + 1) if i + 1 < count else -1
    return runs


def _add(runs: list[tuple[int, int]], start: int, end: int) -> None:
    if runs and runs[-1][1] == start:
        runs[-1] = (runs[-1][0], end)
    else:
        runs.append((start, end))


def plain_file_fd(node: Node) -> int | None:
    """The descriptor of a plain file shown unchanged by ``node`` (raw without offset over file)."""
    depth = 0
    while node is not None and depth < 8:
        fd = getattr(node.driver, "fd", None)
        if node.kind.value == "protocol":
            if isinstance(fd, int) and fd >= 0 and not getattr(node.driver, "is_blk", True):
                return fd
            return None
        child = node.filtered
        if child is None:
            return None
        node = child.node
        depth += 1
    return None


class Copier:
    def __init__(self, sources: list[Source], target: BlockBackend, opts: CopyOptions, progress: Progress) -> None:
        self.sources, self.target, self.o, self.progress = sources, target, opts, progress
        self.total = sum(s.span for s in sources)
        self.pos = 0
        self.next_status = 0
        self.status = DATA
        self.lock = asyncio.Lock()
        self.wr_offs = 0
        self.waiters: dict[int, asyncio.Future] = {}
        # In order, writes are issued one after the other with the next one already queued behind the
        # running one, so the target never waits for the loop to hand it work.
        self.window = asyncio.Semaphore(WRITE_WINDOW if opts.in_order else opts.workers)
        self.allocated = self.allocated_done = 0
        self.error: BaseException | None = None
        self.gran = max(pow2floor(opts.min_sparse), target.node.limits.request_alignment, SECTOR,
                        opts.compress_cluster) if opts.min_sparse else 0
        self.wflags = ReqFlags.WRITE_COMPRESSED if opts.compress_cluster else ReqFlags.NONE
        self.zeros = bytes(self.gran) if self.gran else b""
        self.zero_full = bytes(opts.buf_size) if self.gran else b""
        self.t0 = time.monotonic()
        self.written = 0

    # ---------------------------------------------------------------- planning

    def part(self, pos: int) -> Source:
        for s in self.sources:
            if pos < s.start + s.span:
                return s
        raise AssertionError(pos)

    async def plan(self, pos: int) -> tuple[int, str]:
        """Length and kind of the chunk starting at ``pos`` (convert_iteration_sectors)."""
        src = self.part(pos)
        n = min(self.total - pos, MAX_REQUEST)
        o = self.o
        post_backing_zero = False
        if o.target_backing_len >= 0:
            if pos >= o.target_backing_len:
                post_backing_zero = True
            elif pos + n > o.target_backing_len:
                n = o.target_backing_len - pos
        if self.next_status <= pos:
            rel = pos - src.start
            if rel >= src.length:  # the zero padding of a source that is not a whole number of sectors
                flags, count = Status.ZERO, src.span - rel
            else:
                base = None
                if o.target_has_backing:
                    cow = src.blk.node.cow_child()
                    base = cow.node if cow is not None else None
                try:
                    st, _ = await src.blk.block_status(rel, min(n, src.length - rel), base=base)
                except BlockGraphError as e:
                    if not o.salvage:
                        raise ImgExit(f"error while reading block status at offset {rel}: "
                                      f"{getattr(e, 'strerror', e)}") from None
                    st = None
                flags, count = (st.flags, st.length) if st is not None else (Status.DATA, SECTOR)
                if rel + count >= src.length:
                    count = src.span - rel
            n = -(-count // SECTOR) * SECTOR
            tail = (pos - src.start + n) % src.align
            if n > tail:
                n -= tail
            if flags & Status.ZERO:
                self.status = BACKING if post_backing_zero else ZERO
            elif flags & Status.DATA:
                self.status = DATA
            else:
                self.status = BACKING if o.target_has_backing else DATA
            self.next_status = pos + n
        n = min(n, self.next_status - pos)
        if self.status == DATA:
            n = min(n, o.buf_size)
        cc = o.compress_cluster
        if cc:  # compressed writes cover whole clusters: a short piece is taken as data up to the cluster end
            if n < cc:
                return min(cc, self.total - pos), DATA
            n -= n % cc
        return n, self.status

    async def count_allocated(self) -> None:
        pos = 0
        while pos < self.total:
            n, status = await self.plan(pos)
            if status == DATA or (not self.o.min_sparse and status == ZERO):
                self.allocated += n
            pos += n
        self.next_status = 0

    # ---------------------------------------------------------------- workers

    async def run(self) -> None:
        await self.count_allocated()  # what the progress meter counts (also kept for SIGUSR1)
        tasks = [asyncio.ensure_future(self.worker()) for _ in range(self.o.workers)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def worker(self) -> None:
        buf = bytearray(self.o.buf_size)
        view = memoryview(buf)
        o = self.o
        while True:
            async with self.lock:
                if self.pos >= self.total:
                    return
                start = self.pos
                n, status = await self.plan(start)
                if not o.min_sparse and status == ZERO:
                    n = min(n, o.buf_size)
                self.pos = start + n
            if self.allocated and (status == DATA or (not o.min_sparse and status == ZERO)):
                self.allocated_done += n
                if self.progress.enabled or self.progress.pending:
                    self.progress.print(100.0 * self.allocated_done / self.allocated, 0)
            copy_range = o.copy_range and status == DATA
            if status == DATA and not copy_range:
                await self.read(start, n, buf, view)
            elif not o.min_sparse and status == ZERO:
                status = DATA
                view[:n] = bytes(n)
            if o.in_order and self.wr_offs != start:
                fut = asyncio.get_running_loop().create_future()
                self.waiters[start] = fut
                await fut
            await self.window.acquire()
            try:
                if o.in_order:
                    # Hand the turn on before awaiting: the next writer can only run once this write has
                    # been submitted (the loop is single-threaded), so writes reach the target in order.
                    self.wr_offs = start + n
                    nxt = self.waiters.pop(self.wr_offs, None)
                    if nxt is not None and not nxt.done():
                        nxt.set_result(None)
                if copy_range:
                    await self.copy_or_write(start, n, buf, view)
                else:
                    await self.write(start, n, buf, view, status)
            finally:
                self.window.release()
            if o.rate_limit:
                await self.throttle(n if status == DATA else 0)

    async def copy_or_write(self, start: int, n: int, buf: bytearray, view: memoryview) -> None:
        if not await self.copy_range(start, n):
            await self.read(start, n, buf, view)
            await self.write(start, n, buf, view, DATA)

    async def read(self, pos: int, n: int, buf: bytearray, view: memoryview) -> None:
        done = 0
        while done < n:
            src = self.part(pos + done)
            rel = pos + done - src.start
            m = min(n - done, src.start + src.span - (pos + done))
            real = max(0, min(m, src.length - rel))
            try:
                if real:
                    await src.blk.preadv(rel, view[done:done + real])
            except BlockGraphError as e:
                if not self.o.salvage:
                    raise ImgExit(f"error while reading at byte {pos + done}: {getattr(e, 'strerror', e)}") \
                        from None
                await self.salvage(src, rel, view[done:done + real])
            if real < m:
                view[done + real:done + m] = bytes(m - real)
            done += m

    async def salvage(self, src: Source, rel: int, view: memoryview) -> None:
        for off in range(0, len(view), SECTOR):
            piece = view[off:off + SECTOR]
            try:
                await src.blk.preadv(rel + off, piece)
            except BlockGraphError as e:
                if not self.o.quiet:
                    report(f"warning: error while reading offset {rel + off}: {getattr(e, 'strerror', e)}")
                piece[:] = bytes(len(piece))

    async def write(self, pos: int, n: int, buf: bytearray, view: memoryview, status: str) -> None:
        try:
            if status == BACKING:
                return
            if status == ZERO:
                await self.zero(pos, n)
                return
            if not self.o.min_sparse:
                await self.target.pwritev(pos, view[:n], self.wflags)
                self.written += n
                return
            done = 0
            for zs, ze in zero_blocks(buf, n, self.gran, self.zeros, self.zero_full):
                if zs > 0 and ze < n and ze - zs < self.o.min_sparse:
                    continue  # a short zero run between data is written as data (is_allocated_sectors_min)
                if zs > done:
                    await self.target.pwritev(pos + done, view[done:zs], self.wflags)
                    self.written += zs - done
                await self.zero(pos + zs, ze - zs)
                done = ze
            if done < n:
                await self.target.pwritev(pos + done, view[done:n], self.wflags)
                self.written += n - done
        except BlockGraphError as e:
            raise ImgExit(f"error while writing at byte {pos}: {getattr(e, 'strerror', e)}") from None

    async def zero(self, pos: int, n: int) -> None:
        if self.o.zero_init or n <= 0:
            return
        await self.target.pwrite_zeroes(pos, n, ReqFlags.MAY_UNMAP)

    async def copy_range(self, pos: int, n: int) -> bool:
        """Kernel copy between plain files; False asks for the read/write fallback (as qemu-img -C)."""
        src = self.part(pos)
        dst_fd = plain_file_fd(self.target.node)
        src_fd = plain_file_fd(src.blk.node)
        rel = pos - src.start
        end = min(n, src.length - rel)
        if dst_fd is None or src_fd is None or end < n or pos + n > src.start + src.span:
            self.o.copy_range = False
            return False

        def work() -> None:
            done = 0
            while done < n:
                got = os.copy_file_range(src_fd, dst_fd, n - done, rel + done, pos + done)
                if got == 0:
                    raise OSError(errno.EIO, "short copy")
                done += got

        try:
            await self.target.session.run_blocking(work)
        except OSError:
            self.o.copy_range = False
            return False
        self.written += n
        return True

    async def throttle(self, n: int) -> None:
        due = self.written / self.o.rate_limit - (time.monotonic() - self.t0)
        if due > 0:
            await asyncio.sleep(due)
