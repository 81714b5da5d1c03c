"""``img rebase``: give an image a new backing file, keeping what it shows (safe mode) or not (``-u``).

Safe mode (qemu-img's): every range the image does not allocate itself is read
through the old and the new backing file; sectors that differ are copied from
the old one into the image (or zeroed where the old one had ended). When the
new backing file is already further down the chain, only ranges allocated
between the two are compared. Then the driver's ``change_backing_file(name,
fmt)`` hook rewrites the header. ``-u`` opens the image without its backing
file and only rewrites the header; ``-b ""`` makes the image standalone.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

from ..driver import Status
from ..errors import BlockGraphError, DriverNotFound
from ..io import block_status, block_status_above, preadv
from .img_commit import find_backing_image
from .img_opts import CommonFlags, Getopt, ImgExit, expect, shared_long, usage_error
from .img_snapshot import call
from .img_util import Progress, cache_mode, format_class, open_backend, run

if TYPE_CHECKING:
    from ..node import Node
    from ..plugins import PluginHost
    from ..session import Session

IO_BUF_SIZE = 2 << 20
SECTOR = 512


def differing_runs(old: memoryview, new: memoryview, n: int) -> list[tuple[int, int]]:
    """``(start, end)`` runs of whole sectors that differ between ``old[:n]`` and ``new[:n]``."""
    if old[:n] == new[:n]:
        return []
    runs: list[tuple[int, int]] = []
    for pos in range(0, n, SECTOR):
        end = min(pos + SECTOR, n)
        if old[pos:end] != new[pos:end]:
            if runs and runs[-1][1] == pos:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((pos, end))
    return runs


async def read_padded(node: Node | None, offset: int, view: memoryview) -> int:
    """Read ``view`` from ``node`` at ``offset``, zeros past its end; returns how many bytes it had."""
    have = 0 if node is None else max(0, min(len(view), node.length - offset))
    if have:
        await preadv(node, offset, view[:have])
    view[have:] = bytes(len(view) - have)
    return have


async def safe_copy(blk: Any, old: Node | None, new: Node | None, prefix: Node | None, meter: Progress) -> None:
    top = blk.node
    size = top.length
    old_buf, new_buf = bytearray(IO_BUF_SIZE), bytearray(IO_BUF_SIZE)
    old_view, new_view = memoryview(old_buf), memoryview(new_buf)
    step = 100.0 / (size / min(size, IO_BUF_SIZE)) if size else 0.0
    offset = 0
    while offset < size:
        n = min(IO_BUF_SIZE, size - offset)
        try:
            st = await block_status(top, offset, n, want_zero=False)
        except BlockGraphError as e:
            raise ImgExit(f"error while reading image metadata: {_reason(e)}") from None
        n = st.length
        if st.flags & Status.ALLOCATED:
            offset += n
            continue
        if prefix is not None and old is not None and offset < old.length:
            above, _ = await block_status_above(old, offset, min(n, old.length - offset), prefix, want_zero=False)
            if not above.flags & Status.ALLOCATED:
                offset += above.length
                continue
            n = above.length
        try:
            had = await read_padded(old, offset, old_view[:n])
        except BlockGraphError:
            raise ImgExit("error while reading from old backing file") from None
        try:
            await read_padded(new, offset, new_view[:n])
        except BlockGraphError:
            raise ImgExit("error while reading from new backing file") from None
        for start, end in differing_runs(old_view, new_view, n):
            try:
                if start >= had:
                    await blk.pwrite_zeroes(offset + start, end - start)
                else:
                    await blk.pwritev(offset + start, old_view[start:end])
            except BlockGraphError as e:
                raise ImgExit(f"Error while writing to COW image: {_reason(e)}") from None
        offset += n
        meter.print(step, 100)


def _reason(e: BlockGraphError) -> str:
    err = getattr(e, "errno", None)
    return os.strerror(err) if isinstance(err, int) and err > 0 else str(e)


async def change_backing(node: Node, name: str | None, fmt: str | None) -> None:
    shown = name or ""
    if not (node.caps is not None and node.caps.change_backing_file):
        raise ImgExit(f"Could not change the backing file to '{shown}': {os.strerror(errno.ENOTSUP)}")
    if name and not fmt:
        raise ImgExit(f"Could not change the backing file to '{shown}': backing format must be specified")
    try:
        await call(node.driver.change_backing_file, name, fmt if name else None)
    except BlockGraphError as e:
        err = getattr(e, "errno", None)
        if err == errno.ENOSPC:
            raise ImgExit(f"Could not change the backing file to '{shown}': No space left in the file header") \
                from None
        raise ImgExit(f"Could not change the backing file to '{shown}': {_reason(e)}") from None


def main(argv: list[str], host: PluginHost) -> int:
    return run(host, lambda session: _main(session, argv))


async def _main(session: Session, argv: list[str]) -> int:
    opts, rest = Getopt("hf:F:b:upt:T:qU", shared_long("object", "image-opts", "force-share")).parse(argv)
    fmt = new_fmt = new_name = None
    cache = src_cache = "writeback"
    unsafe = progress = False
    common = CommonFlags()
    for key, value in common.own(opts):
        if key == "f":
            fmt = value
        elif key == "F":
            new_fmt = value
        elif key == "b":
            new_name = value
        elif key == "u":
            unsafe = True
        elif key == "p":
            progress = True
        elif key == "t":
            cache = value
        elif key == "T":
            src_cache = value
    expect(rest, 1, "Expecting one image file name")
    if not unsafe and new_name is None:
        raise usage_error("Must specify backing file (-b) or use unsafe mode (-u)")
    filename = rest[0]
    quiet, image_opts, force_share = common.quiet, common.image_opts, common.force_share
    meter = Progress(progress and not quiet, 2.0)
    meter.print(0, 100)
    try:
        cache_mode(cache)
        cache_mode(src_cache, "Invalid source cache option: {0}")
        blk = await open_image(session, filename, fmt, image_opts, cache, unsafe)
        top = blk.node
        if new_fmt is not None:
            try:
                session.registry.driver(new_fmt)
            except DriverNotFound:
                raise ImgExit(f"Invalid format name: '{new_fmt}'") from None
        if not unsafe:
            old = top.cow_child().node if top.cow_child() is not None else None
            new, prefix = await open_new_backing(session, top, new_name or "", new_fmt, force_share, src_cache)
            await safe_copy(blk, old, new, prefix, meter)
        await change_backing(top, new_name or None, new_fmt)
        meter.print(100, 0)
    finally:
        meter.end()
    return 0


async def open_image(session: Session, filename: str, fmt: str | None, image_opts: bool, cache: str,
                     unsafe: bool) -> Any:
    """The image, read-write; with ``-u`` without its backing file (formats without one take no such option)."""
    if fmt is not None and "backing" not in getattr(format_class(session, fmt), "child_options", ()):
        unsafe = False
    if unsafe:
        try:
            return await open_backend(session, filename, fmt=fmt, image_opts=image_opts, read_only=False,
                                      cache=cache, options={"backing": None})
        except ImgExit as e:
            if not any("Invalid parameter 'backing'" in line for line in e.lines):
                raise
    return await open_backend(session, filename, fmt=fmt, image_opts=image_opts, read_only=False, cache=cache)


async def open_new_backing(session: Session, top: Node, name: str, fmt: str | None, force_share: bool,
                           cache: str) -> tuple[Node | None, Node | None]:
    """The new backing node, and it again as ``prefix`` when it is already in the chain."""
    from ..backing import full_backing_filename
    from .img_util import open_node

    if not name:
        return None, None
    try:
        full = full_backing_filename(top.filename, name, session.registry)
    except BlockGraphError as e:
        raise ImgExit(f"Could not resolve backing filename: {e}") from None
    prefix = find_backing_image(top, full)
    if prefix is not None:
        return prefix, prefix
    try:
        node = await open_node(session, full, fmt=fmt, read_only=True, force_share=force_share, cache=cache)
    except ImgExit as e:
        raise ImgExit(f"Could not open new backing file '{name}': {e.lines[0] if e.lines else ''}") from None
    return node, None
