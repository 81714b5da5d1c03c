"""``img convert``: copy one or more images (concatenated) into a new or existing image.

As qemu-img: the sources are opened read-only without sharing write (``-U``
shares everything), the target is created first in its own open/close and
then opened with ``cache=unsafe`` (no flush at the end unless ``-t`` asks for
one), holes and zeros are not written when the new target starts out zeroed,
and ``-p`` prints ``    (NN.NN/100%)``. The copy itself is in :mod:`img_copy`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .img_copy import BUF_SIZE, SECTOR, Copier, CopyOptions, Source
from .img_create import BlockGraphErrorText, create_target, parse_create_options, print_help_for
from .img_opts import CommonFlags, Getopt, ImgExit, accumulate, cvtnum, has_help_option, shared_long, strtoul
from .img_util import Progress, cache_mode, format_class, open_backend, protocol_class, run, same_file_guard

if TYPE_CHECKING:
    from ..backend import BlockBackend
    from ..plugins import PluginHost
    from ..session import Session

MAX_BUF = 32768 * SECTOR
LONG = shared_long("object", "image-opts", "force-share") | {
    "target-image-opts": (False, "target-image-opts"), "salvage": (False, "salvage"),
    "target-is-zero": (False, "target-is-zero"), "bitmaps": (False, "bitmaps"),
    "skip-broken-bitmaps": (False, "skip-broken-bitmaps"),
}


def zero_init(node: Any) -> bool:
    """Whether a freshly created image reads as zeros (bdrv_has_zero_init): a driver may say so
    (``has_zero_init``); otherwise only a plain file at the bottom does."""
    depth = 0
    while node is not None and depth < 16:
        declared = getattr(node.driver, "has_zero_init", None)
        if declared is not None:
            return bool(declared() if callable(declared) else declared)
        if node.kind.value == "protocol":
            return node.driver_name == "file" and not getattr(node.driver, "is_blk", True)
        child = node.file or node.primary()
        node = child.node if child is not None else None
        depth += 1
    return False


class Args:
    def __init__(self) -> None:
        self.fmt: str | None = None
        self.out_fmt: str | None = None
        self.backing = self.backing_fmt = self.snapshot = None
        self.options: str | None = None
        self.cache, self.src_cache = "unsafe", "writeback"
        self.copy = CopyOptions()
        self.common = CommonFlags()  # -q, -U, --image-opts, --object
        self.explicit_sparse = self.progress = self.skip_create = False
        self.tgt_image_opts = self.compressed = self.bitmaps = self.skip_broken = False
        self.rate = 0


def parse(argv: list[str]) -> tuple[Args, list[str]]:
    opts, rest = Getopt("hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", LONG).parse(argv)
    a = Args()
    c = a.copy
    for key, value in a.common.own(opts):
        if key == "f":
            a.fmt = value
        elif key == "O":
            a.out_fmt = value
        elif key == "B":
            a.backing = value
        elif key == "C":
            c.copy_range = True
        elif key == "c":
            a.compressed = True
        elif key == "F":
            a.backing_fmt = value
        elif key == "o":
            a.options = accumulate(a.options, value)
        elif key == "l":
            a.snapshot = value
        elif key == "S":
            sval = cvtnum("buffer size for sparse output", value)
            if sval % SECTOR or sval > MAX_BUF:
                raise ImgExit("Invalid buffer size for sparse output specified. Valid sizes are multiples of "
                              f"{SECTOR} up to {MAX_BUF}. Select 0 to disable sparse detection (fully "
                              "allocates output).")
            c.min_sparse, a.explicit_sparse = sval, True
        elif key == "p":
            a.progress = True
        elif key == "t":
            a.cache = value
        elif key == "T":
            a.src_cache = value
        elif key == "n":
            a.skip_create = True
        elif key == "m":
            try:
                c.workers = strtoul(value)
            except ValueError:
                c.workers = 0
            if not 1 <= c.workers <= 16:
                raise ImgExit("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
        elif key == "W":
            c.in_order = False
        elif key == "r":
            a.rate = c.rate_limit = cvtnum("rate limit", value)
        elif key == "target-image-opts":
            a.tgt_image_opts = True
        elif key == "salvage":
            c.salvage = True
        elif key == "target-is-zero":
            c.zero_init = True
        elif key == "bitmaps":
            a.bitmaps = True
        elif key == "skip-broken-bitmaps":
            a.skip_broken = True
    c.quiet = a.common.quiet
    return a, rest


def check(a: Args) -> None:
    """qemu-img's refusals of option combinations, in its order."""
    if not a.out_fmt and not a.tgt_image_opts:
        a.out_fmt = "raw"
    problems = [
        (a.skip_broken and not a.bitmaps, "Use of --skip-broken-bitmaps requires --bitmaps"),
        (a.compressed and a.copy.copy_range, "Cannot enable copy offloading when -c is used"),
        (a.explicit_sparse and a.copy.copy_range, "Cannot enable copy offloading when -S is used"),
        (a.copy.copy_range and a.copy.salvage, "Cannot use copy offloading in salvaging mode"),
        (a.tgt_image_opts and not a.skip_create, "--target-image-opts requires use of -n flag"),
        (a.skip_create and a.options is not None, "-o has no effect when skipping image creation"),
        (a.copy.zero_init and not a.skip_create, "--target-is-zero requires use of -n flag"),
    ]
    for bad, message in problems:
        if bad:
            raise ImgExit(message)


async def open_sources(session: Session, a: Args, names: list[str]) -> list[Source]:
    sources: list[Source] = []
    start = 0
    for name in names:
        blk = await open_backend(session, name, fmt=a.fmt, image_opts=a.common.image_opts,
                                 cache=a.src_cache, force_share=a.common.force_share,
                                 share_all=a.common.force_share)
        length = blk.getlength()
        span = -(-length // SECTOR) * SECTOR
        node = blk.node
        align = max(SECTOR, -(-node.limits.request_alignment // SECTOR) * SECTOR,
                    int(getattr(node.driver, "cluster_size", 0) or 0))
        sources.append(Source(blk, name, start, length, span, align))
        start += span
    return sources


async def create(session: Session, a: Args, out: str, total: int, nsrc: int) -> Any:
    fmt_cls = format_class(session, a.out_fmt)
    protocol_class(session, out)
    if not callable(getattr(fmt_cls, "create", None)) or getattr(fmt_cls, "CreateOptions", None) is None:
        raise ImgExit(f"Format driver '{a.out_fmt}' does not support image creation")
    try:
        values = parse_create_options(fmt_cls, a.out_fmt, a.options)
    except BlockGraphErrorText as e:
        raise ImgExit(str(e)) from None
    from .img_create import _fields

    fields = _fields(fmt_cls)
    for key, value, what in (("backing_file", a.backing, "Backing file"),
                             ("backing_fmt", a.backing_fmt, "Backing file format")):
        if value is not None:
            if key not in fields:
                raise ImgExit(f"{what} not supported for file format '{a.out_fmt}'")
            values[key] = value
    backing = values.get("backing_file")
    a.copy.target_has_backing = bool(backing)
    if nsrc > 1 and backing:
        raise ImgExit("Having a backing file for the target makes no sense when concatenating multiple "
                      "input images")
    if "backing_file" in values and "backing_fmt" not in values:
        raise ImgExit("Use of backing file requires explicit backing format")
    if a.compressed and not can_compress(fmt_cls):
        raise ImgExit("Compression not supported for this file format")
    if a.bitmaps:
        raise ImgExit(f"Format driver '{a.out_fmt}' does not support bitmaps")
    text = ",".join(f"{k}={str(v).replace(',', ',,')}" for k, v in values.items() if k != "size") or None
    try:
        await create_target(session, out, fmt_cls, a.out_fmt, text, total)
    except BlockGraphErrorText as e:
        raise ImgExit(f"{out}: error while converting {a.out_fmt}: {e}") from None
    return fmt_cls


async def convert(session: Session, argv: list[str]) -> int:
    a, rest = parse(argv)
    check(a)
    out = rest[-1] if len(rest) >= 2 else None
    if has_help_option(a.options):
        if not a.out_fmt:
            raise ImgExit("Option help requires a format be specified")
        return print_help_for(session, a.out_fmt, out)
    if len(rest) < 2:
        raise ImgExit("Must specify image file name")
    cache_mode(a.src_cache, "Invalid source cache option: {0}")
    meter = Progress(a.progress and not a.copy.quiet, 1.0)
    meter.print(0, 100)
    ok = False
    try:
        sources = await open_sources(session, a, rest[:-1])
        total = sum(s.span for s in sources)
        if a.snapshot is not None:
            total = await load_snapshot(sources, a.snapshot)
        if not a.skip_create:
            same_file_guard(out, [s.blk.node for s in sources], f"{out}: error while converting {a.out_fmt}: ")
            await create(session, a, out, total, len(sources))
        cache_mode(a.cache)
        target = await open_target(session, a, out)
        if a.skip_create and target.getlength() < total:
            raise ImgExit("output file is smaller than input file")
        c = a.copy
        if not c.zero_init and not a.skip_create and c.min_sparse and not c.target_has_backing:
            c.zero_init = zero_init(target.node)
        if c.target_has_backing and not a.skip_create:
            cow = target.node.cow_child()
            c.target_backing_len = cow.node.length if cow is not None else -1
        lim = target.node.limits
        c.buf_size = min(MAX_BUF, max(BUF_SIZE, lim.opt_transfer, lim.pdiscard_alignment))
        if a.compressed:
            if not can_compress(type(target.node.driver)):
                raise ImgExit("Compression not supported for this file format")
            c.compress_cluster = int(getattr(target.node.driver, "cluster_size", 0) or SECTOR)
            c.buf_size = -(-c.buf_size // c.compress_cluster) * c.compress_cluster
            for s in sources:  # chunks end on target cluster boundaries (both are powers of two)
                s.align = max(s.align, c.compress_cluster)
        await Copier(sources, target, c, meter).run()
        ok = True
    finally:
        if ok:
            meter.print(100, 0)
        meter.end()
    return 0


def can_compress(fmt_cls: type) -> bool:
    """Whether the format stores compressed clusters (accepts ``WRITE_COMPRESSED`` writes)."""
    from ..driver import ReqFlags

    return bool(getattr(fmt_cls, "supported_write_flags", ReqFlags.NONE) & ReqFlags.WRITE_COMPRESSED)


async def load_snapshot(sources: list[Source], text: str) -> int:
    """``-l``: convert an internal snapshot of the (single) source instead of its active layer."""
    from .img_measure import load_snapshot as load

    if len(sources) > 1:
        raise ImgExit("No support for concatenating multiple snapshot")
    src = sources[0]
    await load(src.blk.node, text)
    src.length = src.blk.getlength()
    src.span = -(-src.length // SECTOR) * SECTOR
    return src.span


async def open_target(session: Session, a: Args, out: str) -> BlockBackend:
    _, direct, _ = cache_mode(a.cache)
    unmap = bool(a.copy.min_sparse)
    if a.skip_create:
        return await open_backend(session, out, fmt=a.out_fmt, image_opts=a.tgt_image_opts, read_only=False,
                                  cache=a.cache, unmap=unmap, resize=direct)
    return await open_backend(session, out, fmt=a.out_fmt, read_only=False, cache=a.cache, unmap=unmap,
                              resize=direct)


def main(argv: list[str], host: PluginHost) -> int:
    return run(host, lambda session: convert(session, argv))
