"""``img map``: where the image's data lives, as qemu-img prints it (human or JSON).

Block status is asked layer by layer down the backing chain; the answering
layer's depth, and whether the range is present, zero or data, form one entry;
neighbouring entries that agree (and whose host offsets continue) are merged.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import attrs

from .. import io
from ..driver import Status
from .img_opts import CommonFlags, Getopt, ImgExit, cvtnum, expect, one_of_output, shared_long
from .img_util import open_backend, run

if TYPE_CHECKING:
    from ..node import Node
    from ..plugins import PluginHost
    from ..session import Session


@attrs.define
class MapEntry:
    start: int = 0
    length: int = 0
    data: bool = False
    zero: bool = False
    present: bool = False
    depth: int = 0
    offset: int | None = None
    filename: str | None = None

    def mergeable(self, nxt: MapEntry) -> bool:
        if self.length == 0:
            return False
        if (self.zero, self.data, self.depth, self.present, self.filename) != \
                (nxt.zero, nxt.data, nxt.depth, nxt.present, nxt.filename):
            return False
        if (self.offset is None) != (nxt.offset is None):
            return False
        return self.offset is None or self.offset + self.length == nxt.offset


async def block_status_entry(node: Node, offset: int, length: int) -> MapEntry:
    """One extent's status through the chain; unallocated everywhere reads as nothing at all."""
    depth = 0
    cur: Node | None = node
    while True:
        st = await io.block_status(cur, offset, length, want_zero=True)
        if st.length <= 0:
            raise ImgExit(f"block status returned an empty extent at offset {offset}")
        length = st.length
        flags = st.flags
        if flags & (Status.DATA | Status.ZERO):
            break
        cow = cur.cow_child()
        if cow is None:
            flags = Status.NONE
            break
        cur = cow.node
        depth += 1
        if offset >= cur.length:
            flags = Status.ZERO | Status.ALLOCATED
            break
    has_offset = bool(flags & Status.OFFSET_VALID) and st.offset is not None
    filename = st.file.filename if has_offset and st.file is not None else None
    return MapEntry(start=offset, length=length, data=bool(flags & Status.DATA), zero=bool(flags & Status.ZERO),
                    present=bool(flags & Status.ALLOCATED), depth=depth,
                    offset=st.offset if has_offset else None, filename=filename)


def hexnum(n: int) -> str:
    """C's ``%#x``: no ``0x`` prefix for zero."""
    return f"{n:#x}" if n else "0"


def dump_entry(fmt: str, e: MapEntry, nxt: MapEntry | None, out: list[str]) -> None:
    if fmt == "human":
        if e.data and e.offset is None:
            raise ImgExit("File contains external, encrypted or compressed clusters.")
        if e.data and not e.zero:
            out.append(f"{hexnum(e.start):<16}{hexnum(e.length):<16}{hexnum(e.offset or 0):<16}"
                       f"{e.filename or ''}\n")
        # Human output does not tell zero from unallocated: let those merge.
        if nxt is not None and (not nxt.data or nxt.zero):
            nxt.data, nxt.zero = False, True
        return
    text = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
            f'"present": {_b(e.present)}, "zero": {_b(e.zero)}, "data": {_b(e.data)}')
    if e.offset is not None:
        text += f', "offset": {e.offset}'
    out.append(text + "}" + (",\n" if nxt is not None else ""))


def _b(v: bool) -> str:
    return "true" if v else "false"


async def run_map(node: Node, fmt: str, start: int, max_length: int | None) -> None:
    out: list[str] = ["[" if fmt == "json" else f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n"]
    try:
        async with contextlib.aclosing(map_entries(node, start, max_length)) as entries:
            async for entry, nxt in entries:
                dump_entry(fmt, entry, nxt, out)
                if nxt is not None and len(out) > 256:
                    sys.stdout.write("".join(out))
                    out.clear()
        if fmt == "json":
            out.append("]\n")
    finally:  # what was printed before an error stays printed, as with qemu-img's unbuffered lines
        sys.stdout.write("".join(out))


async def map_entries(node: Node, start: int = 0,
                      max_length: int | None = None) -> AsyncIterator[tuple[MapEntry, MapEntry | None]]:
    """The merged extents of ``[start, start + max_length)`` (clipped to the image), each with its successor.

    The successor is None for the last entry, which is yielded even when empty (qemu-img prints it). A consumer
    may change the successor before asking for more: human output folds zeros into holes that way, so they merge.
    Also behind :meth:`blockgraph.sync.Image.extents`.
    """
    length = node.length
    if max_length is not None:
        length = min(start + max_length, length)
    curr = MapEntry(start=start)
    while curr.start + curr.length < length:
        offset = curr.start + curr.length
        nxt = await block_status_entry(node, offset, length - offset)
        if curr.mergeable(nxt):
            curr.length += nxt.length
            continue
        if curr.length > 0:
            yield curr, nxt
        curr = nxt
    yield curr, None


def main(argv: list[str], host: PluginHost) -> int:
    return run(host, lambda session: _main(session, argv))


async def _main(session: Session, argv: list[str]) -> int:
    long = shared_long("object", "image-opts", "force-share") | {
        "format": (True, "f"), "output": (True, "output"), "start-offset": (True, "start-offset"),
        "max-length": (True, "max-length")}
    opts, rest = Getopt("f:hU", long).parse(argv)
    fmt = output = None
    start, max_length = 0, None
    common = CommonFlags()
    for key, value in common.own(opts):
        if key == "f":
            fmt = value
        elif key == "output":
            output = value
        elif key == "start-offset":
            start = cvtnum("start offset", value)
        elif key == "max-length":
            max_length = cvtnum("max length", value)
    expect(rest, 1, "Expecting one image file name")
    output = one_of_output(output)
    blk = await open_backend(session, rest[0], fmt=fmt, image_opts=common.image_opts,
                             force_share=common.force_share)
    await run_map(blk.node, output, start, max_length)
    return 0
