"""``img bench``: a fixed number of reads or writes, ``depth`` of them in flight at once.

``depth`` worker tasks share one request counter, so at most ``depth``
requests are outstanding and, whenever one waits for the thread pool, the
others carry on. Offsets walk ``offset, offset+step, ...`` modulo the image
size, and ``--flush-interval`` flushes (draining first unless ``--no-drain``)
as qemu-img bench does. The output lines are qemu-img's.
"""

from __future__ import annotations

import asyncio
import mmap
import sys
import time
from typing import TYPE_CHECKING

from ..errors import BlockGraphError
from .img_opts import INT_MAX, CommonFlags, Getopt, ImgExit, cvtnum, expect, shared_long, strtoul
from .img_util import cache_mode, open_backend, run

if TYPE_CHECKING:
    from ..backend import BlockBackend
    from ..plugins import PluginHost
    from ..session import Session


class Bench:
    def __init__(self, blk: BlockBackend, count: int, depth: int, bufsize: int, step: int, offset: int,
                 write: bool, pattern: int, flush_interval: int, drain: bool) -> None:
        self.blk, self.n, self.depth, self.size = blk, count, depth, blk.getlength()
        self.bufsize, self.step, self.offset, self.write = bufsize, step, offset, write
        self.pattern, self.flush_interval, self.drain = pattern, flush_interval, drain
        self.in_flight = 0
        self.resume: asyncio.Event | None = None
        self.flushes: list[asyncio.Task] = []

    def _fail(self, what: str, e: BlockGraphError) -> None:
        raise ImgExit(f"Failed {what}: {getattr(e, 'strerror', None) or e}")

    async def worker(self, buf: memoryview) -> None:
        op = self.blk.pwritev if self.write else self.blk.preadv
        size, step = self.size, self.step
        while True:
            if self.resume is not None:
                await self.resume.wait()
                continue
            if self.n <= self.in_flight:
                return
            offset = self.offset
            self.in_flight += 1
            self.offset = (offset + step) % size if size else 0
            try:
                await op(offset, buf)
            except BlockGraphError as e:
                self._fail("request", e)
            remaining = self.n - self.in_flight
            self.n -= 1
            self.in_flight -= 1
            if self.flush_interval and remaining % self.flush_interval == 0:
                await self._flush_point()
            elif self.resume is not None and self.in_flight == 0:
                await self._drained_flush()

    async def _flush_point(self) -> None:
        if not self.drain:
            self.flushes.append(asyncio.ensure_future(self._flush()))
            return
        if self.resume is None:
            self.resume = asyncio.Event()
        if self.in_flight == 0:
            await self._drained_flush()

    async def _drained_flush(self) -> None:
        await self._flush()
        event, self.resume = self.resume, None
        if event is not None:
            event.set()

    async def _flush(self) -> None:
        try:
            await self.blk.flush()
        except BlockGraphError as e:
            self._fail("flush request", e)

    async def run(self) -> None:
        size = self.bufsize
        memory = mmap.mmap(-1, max(self.depth * size, 1))  # page-aligned, so O_DIRECT needs no bounce buffer
        if self.pattern:
            memory.write(bytes([self.pattern]) * (self.depth * size))
        view = memoryview(memory)
        tasks = [asyncio.ensure_future(self.worker(view[i * size:(i + 1) * size])) for i in range(self.depth)]
        try:
            await asyncio.gather(*tasks)
            if self.flushes:
                await asyncio.gather(*self.flushes)
        finally:
            for t in tasks:
                t.cancel()


def _ulong(value: str, limit: int, message: str) -> int:
    try:
        res = strtoul(value)
    except ValueError:
        raise ImgExit(message) from None
    if res > limit:
        raise ImgExit(message)
    return res


def main(argv: list[str], host: PluginHost) -> int:
    return run(host, lambda session: _main(session, argv))


async def _main(session: Session, argv: list[str]) -> int:
    long = shared_long("image-opts", "force-share") | {
        "flush-interval": (True, "flush-interval"), "pattern": (True, "pattern"), "no-drain": (False, "no-drain")}
    opts, rest = Getopt("hc:d:f:ni:o:qs:S:t:wU", long).parse(argv)
    fmt, aio, cache = None, None, "writeback"
    count, depth, offset, bufsize, step, pattern, flush_interval = 75000, 64, 0, 4096, 0, 0, 0
    write = False
    drain = True
    common = CommonFlags()  # -q is accepted and, as in qemu-img, changes nothing
    for key, value in common.own(opts):
        if key == "c":
            count = _ulong(value, INT_MAX, "Invalid request count specified")
        elif key == "d":
            depth = _ulong(value, INT_MAX, "Invalid queue depth specified")
            if depth == 0:  # qemu-img spins forever with nothing in flight
                raise ImgExit("Invalid queue depth specified")
        elif key == "f":
            fmt = value
        elif key == "n":
            aio = "native"
        elif key == "i":
            if value not in ("threads", "native", "io_uring"):
                raise ImgExit(f"Invalid aio option: {value}")
            aio = value
        elif key == "o":
            offset = cvtnum("offset", value)
        elif key == "s":
            bufsize = cvtnum("buffer size", value, 0, INT_MAX)
        elif key == "S":
            step = cvtnum("step_size", value, 0, INT_MAX)
        elif key == "t":
            cache_mode(value, "Invalid cache mode")
            cache = value
        elif key == "w":
            write = True
        elif key == "pattern":
            pattern = _ulong(value, 0xFF, "Invalid pattern byte specified")
        elif key == "flush-interval":
            flush_interval = _ulong(value, INT_MAX, "Invalid flush interval specified")
        elif key == "no-drain":
            drain = False
    expect(rest, 1, "Expecting one image file name")
    if not write and flush_interval:
        raise ImgExit("--flush-interval is only available in write tests")
    if flush_interval and flush_interval < depth:
        raise ImgExit("Flush interval can't be smaller than depth")
    options = None
    if aio is not None and not common.image_opts:
        proto = fmt is not None and session.registry.drivers.get(fmt) is not None and \
            session.registry.driver_entry(fmt).meta["kind"].value == "protocol"
        options = {"aio": aio} if proto else {"file": {"aio": aio}}
    blk = await open_backend(session, rest[0], fmt=fmt, image_opts=common.image_opts, read_only=not write,
                             force_share=common.force_share, cache=cache, options=options)
    step = step or bufsize
    bench = Bench(blk, count, depth, bufsize, step, offset, write, pattern, flush_interval, drain)
    print(f"Sending {count} {'write' if write else 'read'} requests, {bufsize} bytes each, {depth} in parallel "
          f"(starting at offset {offset}, step size {step})")
    if flush_interval:
        print(f"Sending flush every {flush_interval} requests")
    sys.stdout.flush()
    t1 = time.perf_counter()
    await bench.run()
    t2 = time.perf_counter()
    print(f"Run completed in {t2 - t1:3.3f} seconds.")
    return 0
