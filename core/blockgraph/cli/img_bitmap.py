"""``img bitmap (--add | --remove | --clear | --enable | --disable | --merge SRC)... FILE BITMAP``.

As qemu-img 7.2: the operations run in command-line order through the same
``block-dirty-bitmap-*`` commands QMP offers (:mod:`blockgraph.qmp.commands_bitmaps`),
on the image opened read-write without its backing chain; ``--add`` makes the
bitmap persistent, and the format stores it when the image closes. ``--merge``
takes its source bitmap from the image itself or, with ``-b``, from another image
opened read-only. The first failing operation ends the command with
``Operation OP on bitmap NAME failed: REASON`` (and QEMU's hint, if any).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..errors import BlockGraphError
from ..qmp import commands_bitmaps as qmp
from ..qmp.protocol import QMPError
from .img_opts import CommonFlags, Getopt, ImgExit, cvtnum, shared_long
from .img_util import open_backend, report, run

if TYPE_CHECKING:
    from ..node import Node
    from ..plugins import PluginHost
    from ..session import Session

LONG = {**shared_long("object", "image-opts"),
        "add": (False, "add"), "remove": (False, "remove"), "clear": (False, "clear"), "enable": (False, "enable"),
        "disable": (False, "disable"), "merge": (True, "merge"), "granularity": (True, "g"),
        "source-file": (True, "b"), "source-format": (True, "F")}
ACTIONS = ("add", "remove", "clear", "enable", "disable", "merge")
COMMANDS = {"add": qmp.dirty_bitmap_add, "remove": qmp.dirty_bitmap_remove, "clear": qmp.dirty_bitmap_clear,
            "enable": qmp.dirty_bitmap_enable, "disable": qmp.dirty_bitmap_disable, "merge": qmp.dirty_bitmap_merge}
# The properties of QEMU's secret object (--object secret,id=ID,data=...).
SECRET_KEYS = frozenset({"qom-type", "id", "data", "file", "format", "keyid", "iv"})


class _Graph:
    """What the QMP bitmap commands ask of a daemon: the session's nodes, found by name."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def lookup(self, device: str | None, node_name: str | None) -> Node:
        node = self.session.nodes.get(node_name or "")
        if node is None:
            raise QMPError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")
        return node


def check_object(text: str, ids: set[str]) -> None:
    """``--object``: QEMU's refusals for a missing or unknown type or id, and for a secret without data.

    A valid secret (no image format here needs one) and a throttle group without limits are accepted and
    unused; other objects are refused as blockgraph img has no plugin for them.
    """
    from ..daemon.core import KNOWN_QOM_TYPES
    from ..daemon.setup import keyval_or_json

    try:
        props = keyval_or_json(text, "qom-type")
    except (BlockGraphError, QMPError) as e:
        raise ImgExit(str(e)) from None
    qom_type = props.get("qom-type")
    if qom_type is None:
        raise ImgExit("Parameter 'qom-type' is missing")
    if qom_type not in KNOWN_QOM_TYPES:
        raise ImgExit(f"Parameter 'qom-type' does not accept value '{qom_type}'")
    if qom_type == "iothread":  # not built into qemu-img
        raise ImgExit("invalid object type: iothread")
    if "id" not in props:
        raise ImgExit("Parameter 'id' is missing")
    if qom_type == "throttle-group" and set(props) == {"qom-type", "id"}:
        _new_id(str(props["id"]), ids)
        return
    if qom_type != "secret":
        raise ImgExit.no_object()
    for key in props:
        if key not in SECRET_KEYS:
            raise ImgExit(f"Parameter '{key}' is unexpected")
    if "data" not in props and "file" not in props:
        raise ImgExit("Either 'file' or 'data' must be provided")
    if "file" in props:
        raise ImgExit.no_object()  # reading a secret file: not done here
    _new_id(str(props["id"]), ids)


def _new_id(obj_id: str, ids: set[str]) -> None:
    if obj_id in ids:
        raise ImgExit(f"attempt to add duplicate property '{obj_id}' to object (type 'container')")
    ids.add(obj_id)


def _no_backing_options(text: str, node: Node) -> None:
    """qemu-img opens the image without its backing file (BDRV_O_NO_BACKING), so backing options given with
    --image-opts are left over and refused by the format; ``backing=`` is taken with QEMU's warning."""
    from ..options import flatten, parse_keyval

    backing = parse_keyval(text, implied_key="file").get("backing")
    if backing == "":
        report('warning: Use of "backing": "" is deprecated; use "backing": null instead')
    elif backing is not None:
        key = "backing." + next(iter(flatten(backing))) if isinstance(backing, dict) and backing else "backing"
        raise ImgExit(f"Could not open '{text}': Block format '{node.common.driver}' does not support the option "
                      f"'{key}'")


def _checked_objects(opts: Iterable[tuple[str, str | None]], ids: set[str]) -> Iterator[tuple[str, str | None]]:
    """The options but ``--object``, each checked where it stands (rather than refused by CommonFlags)."""
    for key, value in opts:
        if key == "object":
            check_object(value or "", ids)
        else:
            yield key, value


def main(argv: list[str], host: PluginHost) -> int:
    return run(host, lambda session: _main(session, argv))


async def _main(session: Session, argv: list[str]) -> int:
    opts, rest = Getopt("b:f:F:g:h", LONG).parse(argv)
    fmt = src_fmt = src_filename = None
    granularity = 0
    actions: list[tuple[str, str | None]] = []
    objects: set[str] = set()
    common = CommonFlags()
    for key, value in common.own(_checked_objects(opts, objects)):
        if key == "b":
            src_filename = value
        elif key == "f":
            fmt = value
        elif key == "F":
            src_fmt = value
        elif key == "g":
            granularity = cvtnum("granularity", value or "")
        elif key in ACTIONS:
            actions.append((key, value))
    kinds = {kind for kind, _ in actions}
    if not actions:
        raise ImgExit("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
    if granularity and "add" not in kinds:
        raise ImgExit("granularity only supported with --add")
    if src_fmt and not src_filename:
        raise ImgExit("-F only supported with -b")
    if src_filename and "merge" not in kinds:
        raise ImgExit("Merge bitmap source file only supported with --merge")
    if len(rest) != 2:
        raise ImgExit("Expecting filename and bitmap name")
    filename, bitmap = rest
    # Bitmaps live in this image alone: its backing chain is not opened.
    node = (await open_backend(session, filename, fmt=fmt, image_opts=common.image_opts, read_only=False,
                               options={"backing": None})).node
    if common.image_opts:
        _no_backing_options(filename, node)
    src = node
    if src_filename:
        src = (await open_backend(session, src_filename, fmt=src_fmt, read_only=True,
                                  options={"backing": None})).node
    graph = _Graph(session)
    for op, source in actions:
        args: dict[str, Any] = {"node": node.name, "name": bitmap}
        if op == "add":
            args["persistent"] = True
            if granularity:
                args["granularity"] = granularity & 0xFFFFFFFF  # qemu-img passes it on as a uint32_t
        elif op == "merge":
            args = {"node": node.name, "target": bitmap, "bitmaps": [{"node": src.name, "name": source}]}
        try:
            COMMANDS[op](graph, args)
        except QMPError as e:
            sys.stdout.flush()
            report(f"Operation {op} on bitmap {bitmap} failed: {e.desc}")
            hint = getattr(e.__cause__, "hint", "")
            if hint:
                sys.stderr.write(f"{hint}\n")
            return 1
    return 0

