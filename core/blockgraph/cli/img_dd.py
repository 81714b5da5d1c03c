"""``img dd``: copy an image (or a part of it, ``bs=``/``count=``/``skip=``) into a new image.

As qemu-img dd: ``count`` limits the input from its start (before ``skip``),
a ``skip`` beyond the end is reported and leaves an empty output, and every
block is written (the output is fully allocated). ``-p`` shows progress, which
qemu-img dd does not offer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import BlockGraphError
from .img_create import BlockGraphErrorText, create_target
from .img_opts import INT64_MAX, INT_MAX, CommonFlags, Getopt, ImgExit, cvtnum, shared_long
from .img_util import Progress, format_class, open_backend, protocol_class, report, run, same_file_guard

if TYPE_CHECKING:
    from ..plugins import PluginHost
    from ..session import Session

OPERANDS = ("bs", "count", "if", "of", "skip")


def main(argv: list[str], host: PluginHost) -> int:
    return run(host, lambda session: _main(session, argv))


async def _main(session: Session, argv: list[str]) -> int:
    opts, rest = Getopt("hf:O:Up", shared_long("object", "image-opts", "force-share")).parse(argv)
    out_fmt, fmt = "raw", None
    progress = False
    common = CommonFlags()
    for key, value in common.own(opts):
        if key == "O":
            out_fmt = value
        elif key == "f":
            fmt = value
        elif key == "p":
            progress = True
    bs, count, skip = 512, None, None
    files: dict[str, str] = {}
    for arg in rest:
        name, eq, value = arg.partition("=")
        if not eq or name not in OPERANDS:
            raise ImgExit(f"unrecognized operand {name}")
        if name == "bs":
            bs = cvtnum("bs", value, 1, INT_MAX)
        elif name == "count":
            count = cvtnum("count", value)
        elif name == "skip":
            skip = cvtnum("skip", value)
        else:
            files[name] = value
    if "if" not in files or "of" not in files:
        raise ImgExit("Must specify both input and output files")
    src = await open_backend(session, files["if"], fmt=fmt, image_opts=common.image_opts,
                             force_share=common.force_share)
    try:
        fmt_cls = format_class(session, out_fmt)
    except ImgExit:
        raise ImgExit("Unknown file format") from None
    protocol_class(session, files["of"])
    size = src.getlength()
    if count is not None and count <= INT64_MAX // bs and count * bs < size:
        size = count * bs
    beyond = skip is not None and (skip > INT64_MAX // bs or size < bs * skip)
    out_size = 0 if beyond else size - bs * (skip or 0)
    # qemu-img dd would truncate its own input here (its input shares write); refuse instead.
    same_file_guard(files["of"], [src.node], f"{files['of']}: error while creating output image: ")
    try:
        await create_target(session, files["of"], fmt_cls, out_fmt, None, out_size)
    except BlockGraphErrorText as e:
        raise ImgExit(f"{files['of']}: error while creating output image: {e}") from None
    dst = await open_backend(session, files["of"], fmt=out_fmt, read_only=False)
    if beyond:
        report(f"{files['if']}: cannot skip to specified offset")
        in_pos = size
    else:
        in_pos = bs * (skip or 0)
    meter = Progress(progress, 1.0)
    meter.print(0, 100)
    buf = memoryview(bytearray(bs))
    start, out_pos = in_pos, 0
    try:
        while in_pos < size:
            n = min(bs, size - in_pos)
            chunk = buf[:n]
            try:
                await src.preadv(in_pos, chunk)
            except BlockGraphError as e:
                raise ImgExit(f"error while reading from input image file: {getattr(e, 'strerror', e)}") from None
            in_pos += n
            try:
                await dst.pwritev(out_pos, chunk)
            except BlockGraphError as e:
                raise ImgExit(f"error while writing to output image file: {getattr(e, 'strerror', e)}") from None
            out_pos += n
            meter.print(100.0 * (in_pos - start) / (size - start), 0)
    finally:
        meter.end()
    return 0
