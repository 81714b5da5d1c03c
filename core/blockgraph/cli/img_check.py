"""``img check``: the driver's consistency check (and ``-r`` repair), reported as qemu-img does.

The driver hook is ``check(fix: CheckFix) -> CheckResult`` (plain or async).
Exit codes are qemu-img's: 0 clean (or repaired), 1 the check itself failed,
2 corruptions, 3 leaks only, 63 the format has no check. The per-problem
lines of a :class:`~blockgraph.driver.CheckResult` go to stderr as the driver
wrote them, the summary to stdout; after a repair the image is checked again
and that second result is what is summarised, with the fixed counts kept.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import TYPE_CHECKING, Any

from ..driver import CheckFix, CheckResult
from ..errors import BlockGraphError, NotSupported
from .img_opts import CommonFlags, Getopt, ImgExit, expect, usage_error
from .img_qjson import dumps
from .img_util import cache_mode, open_backend, open_node, qprint, run

if TYPE_CHECKING:
    from ..node import Node
    from ..plugins import PluginHost
    from ..session import Session

NOT_SUPPORTED = 63
CHECK_MODE = {"x-check": True}  # QEMU's BDRV_O_CHECK, seen by the driver as NodeContext.check_mode


def check_node(node: Node) -> Node | None:
    """The node whose driver checks the image: the node itself, or what a filter passes through."""
    depth = 0
    cur: Node | None = node
    while cur is not None and depth < 64:
        if callable(getattr(cur.driver, "check", None)):
            return cur
        if cur.kind.value != "filter" or cur.filtered is None:
            return None
        cur = cur.filtered.node
        depth += 1
    return None


async def run_check(node: Node, fix: CheckFix) -> CheckResult:
    result = node.driver.check(fix)
    if inspect.isawaitable(result):
        result = await result
    return result


def to_json(res: CheckResult, filename: str, fmt: str) -> dict[str, Any]:
    """QAPI ImageCheck: optional members only when non-zero, in the schema's order."""
    out: dict[str, Any] = {"filename": filename, "format": fmt, "check-errors": res.check_errors}
    for key, value in (("image-end-offset", res.image_end_offset), ("corruptions", res.corruptions),
                       ("leaks", res.leaks), ("corruptions-fixed", res.corruptions_fixed),
                       ("leaks-fixed", res.leaks_fixed), ("total-clusters", res.total_clusters),
                       ("allocated-clusters", res.allocated_clusters),
                       ("fragmented-clusters", res.fragmented_clusters),
                       ("compressed-clusters", res.compressed_clusters)):
        if value:
            out[key] = value
    return out


def human(res: CheckResult) -> list[str]:
    lines: list[str] = []
    if not (res.corruptions or res.leaks or res.check_errors):
        lines.append("No errors were found on the image.")
    else:
        if res.corruptions:
            lines += ["", f"{res.corruptions} errors were found on the image.",
                      "Data may be corrupted, or further writes to the image may corrupt it."]
        if res.leaks:
            lines += ["", f"{res.leaks} leaked clusters were found on the image.",
                      "This means waste of disk space, but no harm to data."]
        if res.check_errors:
            lines += ["", f"{res.check_errors} internal errors have occurred during the check."]
    if res.total_clusters and res.allocated_clusters:
        alloc = res.allocated_clusters
        lines.append(f"{alloc}/{res.total_clusters} = {alloc * 100.0 / res.total_clusters:0.2f}% allocated, "
                     f"{res.fragmented_clusters * 100.0 / alloc:0.2f}% fragmented, "
                     f"{res.compressed_clusters * 100.0 / alloc:0.2f}% compressed clusters")
    if res.image_end_offset:
        lines.append(f"Image end offset: {res.image_end_offset}")
    return lines


def _messages(res: CheckResult) -> None:
    for line in res.messages:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _reason(e: BlockGraphError) -> str:
    err = getattr(e, "errno", None)
    return os.strerror(err) if isinstance(err, int) and err > 0 else str(e)


async def open_for_check(session: Session, filename: str, fmt: str | None, image_opts: bool, fix: bool,
                         force_share: bool, cache: str) -> Node:
    """The image as qemu-img check opens it (BDRV_O_CHECK): a repair opens it read-only and then reopens it
    read-write, so that the driver's open-time fixes (a dirty image's automatic repair, the corrupt bit's
    refusal) leave the work to the check, which reports it. The top node is opened in check mode (``x-check``)."""
    if not fix:
        blk = await open_backend(session, filename, fmt=fmt, image_opts=image_opts, read_only=True,
                                 force_share=force_share, share_all=False, cache=cache, options=dict(CHECK_MODE))
        return blk.node
    try:
        node = await open_node(session, filename, fmt=fmt, image_opts=image_opts, read_only=True, cache=cache,
                               options=dict(CHECK_MODE))
    except ImgExit:  # some formats open only read-write when they need fixing (a VHDX log to replay)
        return await _open_rw(session, filename, fmt, image_opts, cache)
    if node.caps is not None and node.caps.reopen:
        try:
            await session.reopen(node, read_only=False)
            return node
        except BlockGraphError as e:
            raise ImgExit(f"Could not open '{filename}': {e}") from None
    from ..node import close_node

    await close_node(node)
    return await _open_rw(session, filename, fmt, image_opts, cache)


async def _open_rw(session: Session, filename: str, fmt: str | None, image_opts: bool, cache: str) -> Node:
    blk = await open_backend(session, filename, fmt=fmt, image_opts=image_opts, read_only=False,
                             share_all=False, cache=cache, options=dict(CHECK_MODE))
    return blk.node


def main(argv: list[str], host: PluginHost) -> int:
    return run(host, lambda session: _main(session, argv))


async def _main(session: Session, argv: list[str]) -> int:
    opts, rest = Getopt("hf:r:T:qU", {"format": (True, "f"), "repair": (True, "r"), "output": (True, "output"),
                                      "object": (True, "object"), "image-opts": (False, "image-opts"),
                                      "force-share": (False, "U")}).parse(argv)
    fmt = output = None
    cache = "writeback"
    fix = CheckFix.NONE
    common = CommonFlags()
    for key, value in opts:
        if common.take(key, value):
            continue
        if key == "f":
            fmt = value
        elif key == "r":
            if value == "leaks":
                fix = CheckFix.LEAKS
            elif value == "all":
                fix = CheckFix.LEAKS | CheckFix.ERRORS
            else:
                raise usage_error(f"Unknown option value for -r (expecting 'leaks' or 'all'): {value}")
        elif key == "output":
            output = value
        elif key == "T":
            cache = value
    expect(rest, 1, "Expecting one image file name")
    filename = rest[0]
    if output not in (None, "human", "json"):
        raise ImgExit("--output must be used with human or json as argument.")
    cache_mode(cache, "Invalid source cache option: {0}")
    quiet = common.quiet
    top = await open_for_check(session, filename, fmt, common.image_opts, bool(fix), common.force_share, cache)
    node = check_node(top)
    if node is None:
        raise ImgExit("This image format does not support checks", NOT_SUPPORTED)
    try:
        res = await run_check(node, fix)
        _messages(res)
        if res.corruptions_fixed or res.leaks_fixed:
            if output != "json":
                qprint(quiet, "The following inconsistencies were found and repaired:\n\n"
                              f"    {res.leaks_fixed} leaked clusters\n    {res.corruptions_fixed} corruptions\n\n"
                              "Double checking the fixed image now...")
            fixed = (res.leaks_fixed, res.corruptions_fixed)
            res = await run_check(node, CheckFix.NONE)
            _messages(res)
            res.leaks_fixed, res.corruptions_fixed = fixed
    except NotSupported:  # a driver that cannot do this mode (vdi has no repair): qemu-img's -ENOTSUP text
        raise ImgExit("This image format does not support checks", NOT_SUPPORTED) from None
    except BlockGraphError as e:
        for line in getattr(e, "check_messages", ()):  # what the driver found before it had to stop
            sys.stderr.write(line + "\n")
        raise ImgExit(f"Check failed: {_reason(e)}") from None
    if output == "json":
        qprint(quiet, dumps(to_json(res, filename, top.driver_name)))
    else:
        for line in human(res):
            qprint(quiet, line)
    sys.stdout.flush()
    if res.check_errors:
        raise ImgExit("Check failed")
    if res.corruptions:
        return 2
    return 3 if res.leaks else 0
