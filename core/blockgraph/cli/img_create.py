"""``img create``: make a new image through the format driver's ``create`` classmethod.

``-o`` options are checked against the driver's ``CreateOptions`` attrs class,
so a format plugin gets ``create``, ``-o help`` and the ``Formatting ...``
line without any CLI change. Shared with ``convert`` and ``dd``, which create
their targets the same way.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .img_opts import CommonFlags, Getopt, ImgExit, accumulate, cvtnum, has_help_option, shared_long, usage_error
from .img_util import create_image, format_class, open_node, protocol_class, run

if TYPE_CHECKING:
    from ..plugins import PluginHost
    from ..session import Session

SIZE_HELP = ("Parameter 'size' expects a non-negative number below 2^64\n"
             "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
             "and exabytes, respectively.")


def _fields(cls: type) -> dict[str, Any]:
    from ..options import option_fields

    opts = getattr(cls, "CreateOptions", None)
    return option_fields(opts) if opts is not None else {}


def _kind(field: Any) -> str:
    from ..options import parse_bool, parse_int, parse_size

    conv = field.converter
    if conv is parse_size:
        return "size"
    if conv is parse_bool:
        return "bool (on/off)"
    if conv is parse_int:
        return "num"
    return "str"


def option_help(fmt_cls: type, fmt: str, filename: str | None) -> None:
    """``-o help``: the create options of the format, sorted by name as qemu-img lists them."""
    print("Supported options:" if filename else f"Supported {fmt} options:")
    for key, field in sorted(_fields(fmt_cls).items()):
        head = f"{key}=<{_kind(field)}>"
        text = field.metadata.get("help", "")
        print(f"  {head:<22} - {text}" if text else f"  {head}")
    if not filename:
        print("\nThe protocol level may support further options.\n"
              "Specify the target filename to include those options.")


def print_help_for(session: Session, fmt: str, filename: str | None) -> int:
    fmt_cls = format_class(session, fmt)
    if not callable(getattr(fmt_cls, "create", None)) or getattr(fmt_cls, "CreateOptions", None) is None:
        raise ImgExit(f"Format driver '{fmt}' does not support image creation")
    if filename:
        protocol_class(session, filename)
    option_help(fmt_cls, fmt, filename)
    return 0


def parse_create_options(fmt_cls: type, fmt: str, text: str | None) -> dict[str, str]:
    """``-o`` text -> {key: value}; unknown keys and ill-typed sizes/booleans are refused at once."""
    from ..options import split_keyval

    fields = _fields(fmt_cls)
    values: dict[str, str] = {}
    for part in split_keyval(text) if text else []:
        key, eq, value = part.partition("=")
        if key not in fields:
            raise BlockGraphErrorText(f"Invalid parameter '{key}'")
        if not eq:
            value = "on"  # QemuOpts reads a bare key as key=on
        check_value(fields[key], key, value)
        values.pop(key, None)
        values[key] = value
    return values


def check_value(field: Any, key: str, value: str) -> None:
    """What QemuOpts refuses while parsing ``-o`` (sizes, booleans), before anything is printed."""
    kind = _kind(field)
    if kind == "size":
        try:
            field.converter(value)
        except ValueError:
            from ..options import qemu_value_error

            raise BlockGraphErrorText(qemu_value_error(field.converter, key, value) or SIZE_HELP) from None
    elif kind == "bool (on/off)" and value not in ("on", "off", "yes", "no", "true", "false", "y", "n"):
        raise BlockGraphErrorText(f"Parameter '{key}' expects 'on' or 'off'")


class BlockGraphErrorText(Exception):
    """A message for ``qemu-img: FILE: message``."""


async def create_target(session: Session, filename: str, fmt_cls: type, fmt: str, options: str | None,
                        size: int) -> None:
    """Create an output image (convert, dd): ``-o`` options plus the size, no ``Formatting`` line.

    Raises BlockGraphErrorText with the reason; the caller words the error.
    """
    from ..errors import BlockGraphError

    if not callable(getattr(fmt_cls, "create", None)) or getattr(fmt_cls, "CreateOptions", None) is None:
        raise ImgExit(f"Format driver '{fmt}' does not support image creation")
    values = parse_create_options(fmt_cls, fmt, options)
    values.pop("size", None)
    values["size"] = size
    opts = build_options(fmt_cls, values)
    try:
        await create_image(session, fmt_cls, filename, opts)
    except BlockGraphError as e:
        raise BlockGraphErrorText(str(e)) from None


def formatting_line(filename: str, fmt: str, fmt_cls: type, values: dict[str, Any]) -> str:
    """``Formatting 'F', fmt=raw size=N ...``: options in the driver's declaration order."""
    parts = [f"Formatting '{filename}', fmt={fmt}"]
    values = {**getattr(fmt_cls, "create_shown_defaults", {}), **values}  # what QEMU prints even when not given
    for key, field in _fields(fmt_cls).items():
        if key not in values:
            continue
        value = values[key]
        if _kind(field) == "size" and not isinstance(value, int):
            value = field.converter(value)
        parts.append(f"{key}={str(value).replace(',', ',,')}")
    return " ".join(parts)


def build_options(fmt_cls: type, values: dict[str, Any]) -> Any:
    """The driver's CreateOptions object; a refused value reads ``invalid parameter value: V``."""
    from ..options import structure

    fields = _fields(fmt_cls)
    for key, value in values.items():
        conv = fields[key].converter
        if conv is not None and getattr(conv, "__name__", "").startswith("one_of("):
            try:
                conv(value)
            except ValueError:
                if getattr(fmt_cls, "create_qapi_enums", False):  # drivers whose create goes through QAPI
                    raise BlockGraphErrorText(f"Parameter '{key}' does not accept value '{value}'") from None
                raise BlockGraphErrorText(f"invalid parameter value: {value}") from None
    try:
        return structure(fmt_cls.CreateOptions, values)
    except Exception as e:  # OptionError names the option; qemu prints the reason only
        raise BlockGraphErrorText(getattr(e, "reason", str(e))) from None


async def img_create(session: Session, filename: str, fmt: str, options: str | None, size: int | None, *,
                     backing: str | None = None, backing_fmt: str | None = None, unsafe: bool = False,
                     quiet: bool = False, override_size: bool = False) -> None:
    """QEMU's ``bdrv_img_create``; errors are raised as ``ImgExit('F: reason')``."""
    try:
        await _create(session, filename, fmt, options, size, backing, backing_fmt, unsafe, quiet, override_size)
    except BlockGraphErrorText as e:
        sys.stdout.flush()
        raise ImgExit(f"{filename}: {e}") from None


async def _create(session: Session, filename: str, fmt: str, options: str | None, size: int | None,
                  backing: str | None, backing_fmt: str | None, unsafe: bool, quiet: bool,
                  override_size: bool) -> None:
    from ..errors import BlockGraphError

    fmt_cls = format_class(session, fmt, prefix=f"{filename}: ")
    if not callable(getattr(fmt_cls, "create", None)) or getattr(fmt_cls, "CreateOptions", None) is None:
        raise BlockGraphErrorText(f"Format driver '{fmt}' does not support image creation")
    protocol_class(session, filename, prefix=f"{filename}: ")
    values = parse_create_options(fmt_cls, fmt, options)
    fields = _fields(fmt_cls)
    if "size" in values and size is not None and not override_size:
        raise BlockGraphErrorText("The image size must be specified only once")
    if size is not None:
        values.pop("size", None)
        values["size"] = size
    for key, value, what in (("backing_file", backing, "Backing file"), ("backing_fmt", backing_fmt,
                                                                           "Backing file format")):
        if value is not None:
            if key not in fields:
                raise BlockGraphErrorText(f"{what} not supported for file format '{fmt}'")
            values[key] = value
    backing = values.get("backing_file", backing)
    if backing and not unsafe:
        from ..backing import full_backing_filename

        # Relative to the new image, as the image will name it (bdrv_get_full_backing_filename_from_filename).
        full = full_backing_filename(filename, backing, session.registry)
        try:
            node = await open_node(session, full, fmt=values.get("backing_fmt"), read_only=True, force_share=True)
        except ImgExit as e:
            # bdrv_img_create prints bdrv_open's own error, without qemu-img's "Could not open 'F': " prefix
            # (a missing file still says "Could not open 'dir/name': ...": that is file's text).
            reason = "\n".join(e.lines).removeprefix(f"Could not open '{full}': ")
            raise BlockGraphErrorText(f"{reason}\nCould not open backing image.") from None
        if "backing_fmt" not in values:
            raise BlockGraphErrorText(f"Backing file specified without backing format\n"
                                      f"Detected format of {node.driver_name}.")
        if "size" not in values:
            values["size"] = node.length
    if "size" not in values and "size" in fields and fields["size"].default is _nothing():
        raise BlockGraphErrorText("Image creation needs a size parameter")
    if not quiet:
        print(formatting_line(filename, fmt, fmt_cls, values), flush=True)
    opts = build_options(fmt_cls, values)
    try:
        await create_image(session, fmt_cls, filename, opts)
    except BlockGraphError as e:
        raise BlockGraphErrorText(str(e)) from None


def _nothing() -> Any:
    import attrs

    return attrs.NOTHING


def main(argv: list[str], host: PluginHost) -> int:
    return run(host, lambda session: _main(session, argv))


async def _main(session: Session, argv: list[str]) -> int:
    opts, rest = Getopt("F:b:f:ho:qu", shared_long("object")).parse(argv)
    fmt, options, unsafe = "raw", None, False
    backing = backing_fmt = None
    common = CommonFlags()
    for key, value in common.own(opts):
        if key == "f":
            fmt = value
        elif key == "o":
            options = accumulate(options, value)
        elif key == "u":
            unsafe = True
        elif key == "b":
            backing = value
        elif key == "F":
            backing_fmt = value
    filename = rest[0] if rest else None
    if has_help_option(options):
        return print_help_for(session, fmt, filename)
    if filename is None:
        raise usage_error("Expecting image file name")
    size = cvtnum("image size", rest[1]) if len(rest) > 1 else None
    if len(rest) > 2:
        raise usage_error(f"Unexpected argument: {rest[2]}")
    await img_create(session, filename, fmt, options, size, backing=backing, backing_fmt=backing_fmt,
                     unsafe=unsafe, quiet=common.quiet)
    return 0
