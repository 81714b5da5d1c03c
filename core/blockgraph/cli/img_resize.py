"""``img resize``: grow (optionally preallocated) or shrink (with ``--shrink``) an image.

The size is taken from the last argument before option parsing, so ``-1G``
is a size, not an option, exactly as with qemu-img.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..driver import PreallocMode
from ..errors import BlockGraphError, BlockIOError
from .img_create import SIZE_HELP
from .img_opts import INT64_MAX, CommonFlags, Getopt, ImgExit, shared_long, strtosz, usage_error
from .img_util import open_backend, qprint, run

if TYPE_CHECKING:
    from ..plugins import PluginHost
    from ..session import Session

SHRINK_WARNING = ("warning: Shrinking an image will delete all data beyond the shrunken image's end. Before "
                  "performing such an operation, make sure there is no important data there.")


def _int64(n: int) -> int:
    n &= (1 << 64) - 1
    return n - (1 << 64) if n > INT64_MAX else n


def main(argv: list[str], host: PluginHost) -> int:
    return run(host, lambda session: _main(session, argv))


async def _main(session: Session, argv: list[str]) -> int:
    if len(argv) < 3:
        raise usage_error("Not enough arguments")
    size_arg = argv[-1]
    long = shared_long("object", "image-opts") | {"preallocation": (True, "preallocation"),
                                                  "shrink": (False, "shrink")}
    opts, rest = Getopt("f:hq", long).parse(argv[:-1])
    fmt = None
    shrink = False
    prealloc = PreallocMode.OFF
    common = CommonFlags()
    for key, value in common.own(opts):
        if key == "f":
            fmt = value
        elif key == "shrink":
            shrink = True
        elif key == "preallocation":
            try:
                prealloc = PreallocMode(value)
            except ValueError:
                raise ImgExit(f"Invalid preallocation mode '{value}'") from None
    if len(rest) != 1:
        raise usage_error("Expecting image file name and size")
    relative = {"+": 1, "-": -1}.get(size_arg[:1], 0)
    try:
        n = _int64(strtosz(size_arg[1:] if relative else size_arg))
    except (ValueError, OverflowError):
        raise ImgExit(SIZE_HELP) from None
    blk = await open_backend(session, rest[0], fmt=fmt, image_opts=common.image_opts, read_only=False,
                             resize=True)
    current = blk.getlength()
    total = _int64(current + n * relative) if relative else n
    if total <= 0:
        raise ImgExit("New image size must be positive")
    if total <= current and prealloc is not PreallocMode.OFF:
        raise ImgExit("Preallocation can only be used for growing images")
    if total < current and not shrink:
        raise ImgExit(["Use the --shrink option to perform a shrink operation.", SHRINK_WARNING])
    try:
        await blk.truncate(total, exact=True, prealloc=prealloc)
    except BlockIOError as e:
        raise ImgExit(e.strerror) from None
    except BlockGraphError as e:
        raise ImgExit(str(e)) from None
    qprint(common.quiet, "Image resized.")
    return 0
