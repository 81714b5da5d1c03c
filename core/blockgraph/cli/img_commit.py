"""``img commit``: copy what the top image holds down into a base image of its backing chain.

As qemu-img (an active commit run to completion): the base is the immediate
backing file unless ``-b`` names one further down; the base is reopened
read-write, grown to the top's size if smaller, and receives every range
allocated above it (zeros as write-zeroes). Then the top is emptied through
the driver's ``make_empty`` hook, unless ``-d`` (or ``-b``, which implies it)
keeps it, since its other backing files are now stale. ``Image committed.``
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import TYPE_CHECKING, Any

from ..driver import ReqFlags, Status
from ..errors import BlockGraphError
from ..io import block_status_above
from .img_opts import CommonFlags, Getopt, ImgExit, cvtnum, expect, shared_long
from .img_snapshot import call
from .img_util import Progress, cache_mode, open_backend, qprint, run

if TYPE_CHECKING:
    from ..node import Node
    from ..plugins import PluginHost
    from ..session import Session

CHUNK = 1 << 20


def chain(node: Node) -> list[Node]:
    """``node`` and its backing files, top first."""
    out = [node]
    while out[-1].cow_child() is not None and len(out) < 1024:
        out.append(out[-1].cow_child().node)
    return out


def _real(path: str) -> str | None:
    try:
        return os.path.realpath(path) if os.path.exists(path) else None
    except OSError:
        return None


def find_backing_image(top: Node, name: str) -> Node | None:
    """QEMU's bdrv_find_backing_image: ``name`` as the header names it, or as a path relative to the image."""
    from ..backing import full_backing_filename

    layers = chain(top)
    for above, below in itertools.pairwise(layers):
        header_name = getattr(above.driver, "backing_file", None)
        if name in (header_name, below.filename):
            return below
        if "://" in name or name.startswith("json:"):
            continue
        want = _real(full_backing_filename(above.filename, name, top.session.registry) if not
                     os.path.isabs(name) else name)
        if want is not None and below.filename and want == _real(below.filename):
            return below
    return None


async def make_writable(session: Session, node: Node) -> Any:
    """Reopen ``node`` read-write (as QEMU's commit does) and attach a backend that writes and may grow it."""
    from ..backend import BlockBackend

    if node.read_only:
        await session.reopen(node, read_only=False)
    return await BlockBackend.attach_new(session, node, share_all=True, resize=True)


async def copy_down(top: Node, base: Node, target: Any, progress: Progress, rate: int) -> None:
    """Every range allocated above ``base`` in ``top``'s chain, read through ``top``, written into ``target``."""
    from ..io import preadv

    total = top.length
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    pos = written = 0
    t0 = time.monotonic()
    while pos < total:
        st, _ = await block_status_above(top, pos, min(CHUNK, total - pos), base)
        n = st.length
        if n <= 0:
            break
        if st.flags & Status.ALLOCATED:
            if st.flags & Status.ZERO:
                await target.pwrite_zeroes(pos, n, ReqFlags.MAY_UNMAP)
            else:
                await preadv(top, pos, view[:n])
                await target.pwritev(pos, view[:n])
                written += n
        pos += n
        progress.print(100.0 * pos / total if total else 100.0, 0)
        if rate:
            due = written / rate - (time.monotonic() - t0)
            if due > 0:
                await asyncio.sleep(due)
    await target.flush()


def main(argv: list[str], host: PluginHost) -> int:
    return run(host, lambda session: _main(session, argv))


async def _main(session: Session, argv: list[str]) -> int:
    opts, rest = Getopt("f:ht:b:dpqr:", shared_long("object", "image-opts")).parse(argv)
    fmt = base_name = None
    cache = "writeback"
    drop = progress = False
    rate = 0
    common = CommonFlags()
    for key, value in common.own(opts):
        if key == "f":
            fmt = value
        elif key == "t":
            cache = value
        elif key == "b":
            base_name, drop = value, True
        elif key == "d":
            drop = True
        elif key == "p":
            progress = True
        elif key == "r":
            rate = cvtnum("rate limit", value)
    expect(rest, 1, "Expecting one image file name")
    filename = rest[0]
    cache_mode(cache)
    blk = await open_backend(session, filename, fmt=fmt, image_opts=common.image_opts, read_only=False, cache=cache,
                             unmap=True)
    top = blk.node
    meter = Progress(progress and not common.quiet, 1.0)
    meter.print(0, 100)
    try:
        if base_name is not None:
            base = find_backing_image(top, base_name)
            if base is None:
                raise ImgExit(f"Did not find '{base_name}' in the backing chain of '{filename}'")
        else:
            cow = top.cow_child()
            if cow is None:
                raise ImgExit("Image does not have a backing file")
            base = cow.node
        try:
            target = await make_writable(session, base)
            if target.getlength() < top.length:
                await target.truncate(top.length)
            await copy_down(top, base, target, meter, rate)
            await target.close()
            if not drop and top.caps is not None and top.caps.make_empty:
                await call(top.driver.make_empty)
        except BlockGraphError as e:
            raise ImgExit(str(e)) from None
        meter.print(100, 0)
    finally:
        meter.end()
    qprint(common.quiet, "Image committed.")
    return 0
