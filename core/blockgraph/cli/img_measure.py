"""``img measure``: how many bytes a new image of ``-O fmt`` needs, for a size or for an existing image.

The answer comes from the output format's ``measure(values, size, source)``
classmethod (see :mod:`blockgraph.driver`), ``values`` being the ``-o``
create options as given; ``-l`` measures an internal snapshot of the source
through its ``snapshot_load_tmp`` hook.
"""

from __future__ import annotations

import inspect
import sys
from typing import TYPE_CHECKING, Any

from ..errors import BlockGraphError
from .img_create import BlockGraphErrorText, parse_create_options
from .img_opts import CommonFlags, Getopt, ImgExit, accumulate, cvtnum, shared_long
from .img_qjson import dumps
from .img_util import format_class, open_backend, run

if TYPE_CHECKING:
    from ..driver import MeasureResult
    from ..node import Node
    from ..plugins import PluginHost
    from ..session import Session


def parse_snapshot_opt(text: str) -> tuple[str | None, str | None]:
    """``-l snapshot.id=ID,snapshot.name=NAME`` (either part) or a bare ID-or-name -> (id, name)."""
    if not text.startswith("snapshot."):
        return None, None
    from ..options import split_keyval

    sid = name = None
    for part in split_keyval(text):
        key, _, value = part.partition("=")
        if key == "snapshot.id":
            sid = value
        elif key == "snapshot.name":
            name = value
        else:
            raise ImgExit(f"Failed in parsing snapshot param '{text}'")
    return sid, name


async def load_snapshot(node: Node, text: str) -> None:
    """Show internal snapshot ``text`` read-only in place of the active layer, or ImgExit as qemu-img."""
    from .img_snapshot import call, find, list_snapshots, snapshot_node

    sid, name = parse_snapshot_opt(text)
    target = snapshot_node(node)
    load = getattr(target.driver, "snapshot_load_tmp", None) if target is not None else None
    if load is None:
        raise ImgExit("Failed to load snapshot: Block driver does not support internal snapshots")
    if sid is None and name is None:
        sn = find(await list_snapshots(node), text)
        if sn is None:
            raise ImgExit("Failed to load snapshot: Can't find snapshot")
        sid = sn.id
    try:
        await call(load, sid, name)
    except BlockGraphError as e:
        raise ImgExit(f"Failed to load snapshot: {getattr(e, 'strerror', None) or e}") from None
    node.length = target.length = await call(target.driver.getlength)


def to_json(res: MeasureResult) -> dict[str, Any]:
    out: dict[str, Any] = {"required": res.required, "fully-allocated": res.fully_allocated}
    if res.bitmaps is not None:
        out["bitmaps"] = res.bitmaps
    return out


def main(argv: list[str], host: PluginHost) -> int:
    return run(host, lambda session: _main(session, argv))


async def _main(session: Session, argv: list[str]) -> int:
    long = shared_long("object", "image-opts", "force-share") | {"output": (True, "output"), "size": (True, "size")}
    opts, rest = Getopt("hf:O:o:l:U", long).parse(argv)
    fmt = options = snapshot = None
    out_fmt = "raw"
    output = "human"
    size: int | None = None
    common = CommonFlags()
    for key, value in common.own(opts):
        if key == "f":
            fmt = value
        elif key == "O":
            out_fmt = value
        elif key == "o":
            options = accumulate(options, value)
        elif key == "l":
            snapshot = value
            parse_snapshot_opt(value)
        elif key == "output":
            if value not in ("json", "human"):
                raise ImgExit("--output must be used with human or json as argument.")
            output = value
        elif key == "size":
            size = cvtnum("image size", value)
    if len(rest) > 1:
        raise ImgExit("At most one filename argument is allowed.")
    filename = rest[0] if rest else None
    if filename is None and (common.image_opts or fmt or snapshot is not None):
        raise ImgExit("--image-opts, -f, and -l require a filename argument.")
    if filename is not None and size is not None:
        raise ImgExit("--size N cannot be used together with a filename.")
    if filename is None and size is None:
        raise ImgExit("Either --size N or one filename must be specified.")
    source = None
    if filename is not None:
        blk = await open_backend(session, filename, fmt=fmt, image_opts=common.image_opts, read_only=True,
                                 force_share=common.force_share)
        source = blk.node
        if snapshot is not None:
            await load_snapshot(source, snapshot)
    fmt_cls = format_class(session, out_fmt)
    if getattr(fmt_cls, "CreateOptions", None) is None or not callable(getattr(fmt_cls, "create", None)):
        raise ImgExit(f"Format driver '{out_fmt}' does not support image creation")
    try:
        values = parse_create_options(fmt_cls, out_fmt, options)
    except BlockGraphErrorText as e:
        raise ImgExit([str(e), f"Invalid options for file format '{out_fmt}'"]) from None
    if size is not None:
        values.pop("size", None)
        values["size"] = str(size)
    measure = getattr(fmt_cls, "measure", None)
    if not callable(measure):
        raise ImgExit(f"Block driver '{out_fmt}' does not support size measurement")
    try:
        res = measure(values, size, source)
        if inspect.isawaitable(res):
            res = await res
    except BlockGraphError as e:
        raise ImgExit(str(e)) from None
    if output == "json":
        sys.stdout.write(dumps(to_json(res)) + "\n")
    else:
        sys.stdout.write(f"required size: {res.required}\nfully allocated size: {res.fully_allocated}\n")
        if res.bitmaps is not None:
            sys.stdout.write(f"bitmaps size: {res.bitmaps}\n")
    return 0
