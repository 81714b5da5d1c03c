"""``img amend -o OPTIONS``: change create options of an existing image in place.

The driver declares which of its ``CreateOptions`` keys it can change
(``amend_options``, a tuple of ``-o`` names) and implements ``amend(values,
force, warn)``. A key that only creation knows gets qemu-img's hint ``This
option is only supported for image creation``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ..errors import BlockGraphError
from .img_create import BlockGraphErrorText, _fields, check_value
from .img_opts import CommonFlags, Getopt, ImgExit, accumulate, has_help_option, shared_long, usage_error
from .img_snapshot import call
from .img_util import Progress, cache_mode, format_class, open_backend, run

if TYPE_CHECKING:
    from ..plugins import PluginHost
    from ..session import Session


def amend_values(fmt_cls: type, text: str) -> dict[str, str]:
    """``-o`` text -> {key: value} for the keys the driver can amend, or ImgExit naming the first bad one."""
    from ..options import split_keyval

    fields = _fields(fmt_cls)
    allowed = set(getattr(fmt_cls, "amend_options", ()))
    values: dict[str, str] = {}
    for part in split_keyval(text):
        key, eq, value = part.partition("=")
        if key not in allowed:
            if key in fields:
                raise ImgExit(f"Invalid parameter '{key}'\nThis option is only supported for image creation")
            raise ImgExit(f"Invalid parameter '{key}'")
        if not eq:
            value = "on"
        try:
            check_value(fields[key], key, value)
        except BlockGraphErrorText as e:
            raise ImgExit(str(e)) from None
        values.pop(key, None)
        values[key] = value
    return values


def amend_help(fmt_cls: type, fmt: str) -> int:
    """``-o help``: the amendable options, sorted by name, as qemu-img prints them."""
    from .img_create import _kind

    if not callable(getattr(fmt_cls, "amend", None)):
        raise ImgExit(f"Format driver '{fmt}' does not support option amendment")
    allowed = set(getattr(fmt_cls, "amend_options", ()))
    print(f"Amend options for '{fmt}':")
    for key, field in sorted((k, f) for k, f in _fields(fmt_cls).items() if k in allowed):
        head = f"{key}=<{_kind(field)}>"
        text = field.metadata.get("help", "")
        print(f"  {head:<22} - {text}" if text else f"  {head}")
    return 0


def main(argv: list[str], host: PluginHost) -> int:
    return run(host, lambda session: _main(session, argv))


async def _main(session: Session, argv: list[str]) -> int:
    opts, rest = Getopt("ho:f:t:pq", shared_long("object", "image-opts") | {"force": (False, "force")}).parse(argv)
    fmt = options = None
    cache = "writeback"
    progress = force = False
    common = CommonFlags()
    for key, value in common.own(opts):
        if key == "o":
            options = accumulate(options, value)
        elif key == "f":
            fmt = value
        elif key == "t":
            cache = value
        elif key == "p":
            progress = True
        elif key == "force":
            force = True
    if options is None:
        raise usage_error("Must specify options (-o)")
    if fmt and has_help_option(options):
        return amend_help(format_class(session, fmt), fmt)
    if len(rest) != 1:
        raise ImgExit("Expecting one image file name")
    cache_mode(cache)
    blk = await open_backend(session, rest[0], fmt=fmt, image_opts=common.image_opts, read_only=False, cache=cache)
    node = blk.node
    fmt_cls = type(node.driver)
    if has_help_option(options):
        return amend_help(fmt_cls, node.driver_name)
    if not (node.caps is not None and node.caps.amend):
        raise ImgExit(f"Format driver '{node.driver_name}' does not support option amendment")
    values = amend_values(fmt_cls, options)
    meter = Progress(progress and not common.quiet, 1.0)
    meter.print(0, 0)
    try:
        await call(node.driver.amend, values, force, lambda msg: sys.stderr.write(f"qemu-img: warning: {msg}\n"))
        meter.print(100, 0)
    except BlockGraphError as e:
        raise ImgExit(str(e)) from None
    finally:
        meter.end()
    return 0
