"""``-drive`` expanded as QEMU expands it (blockdev.c drive_new + blockdev_init, block.c bdrv_fill_options).

One ``-drive`` becomes: a protocol node (chosen by the filename prefix, ``file``
by default), a format node over it (``format=``, or probed when the drive is
opened), a copy-on-read filter and a temporary qcow2 overlay when asked for,
a BlockBackend named after the drive id (read-only, write cache, error
policies, throttle limits) and the device the interface implies.

Every node in :attr:`DriveExpansion.blockdevs` carries its effective
``read-only``/``cache.*`` values, so the list works as separate ``-blockdev``
definitions, where nothing is inherited.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from ..errors import BlockGraphError, OptionError
from . import legacy, throttle
from .qemuopts import get_bool, get_number, parse_opts
from .tree import PROBE, TEMPORARY, build_nodes, probe_local

__all__ = ["PROBE", "TEMPORARY", "DriveError", "DriveExpansion", "ParsedDrive", "expand_drive", "parse_drive",
           "probe_local"]

Warn = Callable[[str], None]

CACHE_MODES = {  # cache= -> (cache.writeback, cache.direct, cache.no-flush), bdrv_parse_cache_mode
    "writeback": (True, False, False), "none": (True, True, False), "off": (True, True, False),
    "writethrough": (False, False, False), "directsync": (False, True, False), "unsafe": (True, False, True),
}
AIO_MODES = ("threads", "native", "io_uring")
DETECT_ZEROES = ("off", "on", "unmap")


class DriveError(OptionError):
    """A ``-drive`` that QEMU would refuse; ``text`` is the argument, for ``prog: -drive TEXT: msg``."""

    def __init__(self, reason: str, text: str | None = None) -> None:
        super().__init__(reason)
        self.text = text


@attrs.define
class DriveExpansion:
    """What one ``-drive`` means.

    ``blockdevs`` lists the nodes bottom-up in ``-blockdev`` JSON form; children are
    referenced by node-name. Names in ``generated`` were made up here (QEMU gives such
    nodes ``#blockNNN`` names): :func:`open_drive` opens them unnamed.
    ``backend`` describes the BlockBackend (``name``, ``root``, ``read-only``,
    ``write-cache``, ``rerror``, ``werror``, ``removable``, ``throttle``, ``copy-on-read``),
    ``device`` the frontend (None for ``if=none``).
    """

    text: str
    id: str
    interface: str
    bus: int
    unit: int
    index: int | None
    media: str
    blockdevs: list[dict[str, Any]]
    backend: dict[str, Any]
    device: dict[str, Any] | None
    generated: set[str] = attrs.Factory(set)
    probe: bool = False
    snapshot: bool = False
    requires: list[str] = attrs.Factory(list)
    warnings: list[str] = attrs.Factory(list)

    @property
    def root(self) -> str | None:
        return self.backend.get("root")

    def node(self, name: str) -> dict[str, Any]:
        for bd in self.blockdevs:
            if bd["node-name"] == name:
                return bd
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "if": self.interface, "bus": self.bus, "unit": self.unit, "index": self.index,
                "media": self.media, "blockdevs": self.blockdevs, "backend": self.backend, "device": self.device,
                "probe": self.probe, "snapshot": self.snapshot, "requires": self.requires,
                "warnings": self.warnings}


@attrs.define
class ParsedDrive:
    """A ``-drive`` argument split by the QemuOpts rules, before expansion."""

    text: str
    id: str | None
    opts: dict[str, str]


def parse_drive(text: str, *, snapshot: bool = False, warn: Warn | None = None) -> ParsedDrive:
    """Parse one ``-drive`` argument; ``snapshot`` is ``-snapshot`` (snapshot=on unless set)."""
    try:
        ident, opts = parse_opts(text, warn=warn)
    except OptionError as e:
        raise DriveError(e.reason, text) from None
    if snapshot:
        opts.setdefault("snapshot", "on")
    return ParsedDrive(text, ident, opts)


def expand_drive(drive: ParsedDrive | str, table: legacy.DriveTable | None = None, *, host: Any = None,
                 default_if: str = legacy.DEFAULT_INTERFACE, snapshot: bool = False,
                 warn: Warn | None = None) -> DriveExpansion:
    """Expand one ``-drive``; ``table`` carries the numbering across the drives of one command line.

    ``host`` (a PluginHost) picks protocols by filename prefix and checks drivers and their
    options; without it only QEMU's generic checks run. Errors are :class:`DriveError`.
    """
    parsed = drive if isinstance(drive, ParsedDrive) else parse_drive(drive, warn=warn)
    if snapshot and "snapshot" not in parsed.opts:
        parsed = attrs.evolve(parsed, opts={**parsed.opts, "snapshot": "on"})
    table = table if table is not None else legacy.DriveTable()
    warnings: list[str] = []

    def note(msg: str) -> None:
        warnings.append(msg)
        if warn is not None:
            warn(f"warning: {msg}")

    try:
        if parsed.id is not None:
            table.claim_id(parsed.id)
        return _expand(parsed, table, host, default_if, note, warnings)
    except DriveError:
        raise
    except BlockGraphError as e:
        raise DriveError(getattr(e, "reason", None) or str(e), parsed.text) from None


def _expand(parsed: ParsedDrive, table: legacy.DriveTable, host: Any, default_if: str, note: Warn,
            warnings: list[str]) -> DriveExpansion:
    opts: dict[str, Any] = dict(parsed.opts)
    throttle.rename_legacy(opts)
    if "cache" in opts:
        mode = CACHE_MODES.get(opts.pop("cache"))
        if mode is None:
            raise OptionError("invalid cache option")
        for key, value in zip(("cache.writeback", "cache.direct", "cache.no-flush"), mode, strict=True):
            opts.setdefault(key, "on" if value else "off")  # the specific options take precedence

    # drive_new: the legacy options.
    bus = get_number(opts, "bus", 0)
    unit = get_number(opts, "unit", -1)
    index = get_number(opts, "index", -1)
    media = opts.pop("media", "disk")
    interface = opts.pop("if", None) or default_if
    filename = opts.pop("file", None)
    read_only = get_bool(opts, "read-only", False)
    rerror, werror = opts.pop("rerror", None), opts.pop("werror", None)
    copy_on_read = get_bool(opts, "copy-on-read", False)
    if media not in ("disk", "cdrom"):
        raise OptionError(f"'{media}' invalid media")
    if media == "cdrom":
        read_only = True
    if read_only and copy_on_read:
        note("disabling copy-on-read on read-only drive")
        copy_on_read = False
    if interface not in legacy.INTERFACES:
        raise OptionError(f"unsupported bus type '{interface}'")
    bus, unit = table.assign(interface, bus, unit, index)
    ident = parsed.id or legacy.default_id(interface, bus, unit, media)
    for name, value in (("werror", werror), ("rerror", rerror)):
        if value is not None and interface not in legacy.ERROR_POLICY_INTERFACES:
            raise OptionError(f"{name} is not supported by this bus type")

    # blockdev_init: the options every drive takes.
    snapshot = get_bool(opts, "snapshot", False)
    aio = opts.pop("aio", None)
    writeback = get_bool(opts, "cache.writeback", True)
    fmt = opts.pop("format", None)
    account_invalid = get_bool(opts, "stats-account-invalid", True)
    account_failed = get_bool(opts, "stats-account-failed", True)
    intervals = _stats_intervals(opts)
    if aio is not None and aio not in AIO_MODES:
        raise OptionError("invalid aio option")
    limits, group = throttle.extract(opts)
    detect_zeroes = opts.pop("detect-zeroes", "off")
    if detect_zeroes not in DETECT_ZEROES:
        raise OptionError(f"invalid parameter value: {detect_zeroes}")
    if fmt is not None:
        if "driver" in opts:
            raise OptionError("Cannot specify both 'driver' and 'format'")
        opts["driver"] = fmt
    werror = _error_action(werror or "enospc", read=False)
    rerror = _error_action(rerror or "report", read=True)

    backend: dict[str, Any] = {
        "name": ident, "root": None, "read-only": read_only, "write-cache": writeback,
        "rerror": rerror, "werror": werror, "removable": legacy.removable(interface, media),
        "copy-on-read": copy_on_read, "throttle": None,
        "stats-account-invalid": account_invalid, "stats-account-failed": account_failed,
        "stats-intervals": intervals,
    }
    if throttle.enabled(limits):
        backend["throttle"] = {"group": group or ident, "limits": limits}
    exp = DriveExpansion(text=parsed.text, id=ident, interface=interface, bus=bus, unit=unit,
                         index=None if index == -1 else index, media=media, blockdevs=[], backend=backend,
                         device=legacy.device_for(interface, bus, unit, media, ident), snapshot=snapshot,
                         warnings=warnings)
    if backend["throttle"]:
        exp.requires.append("throttle")
    if filename or opts:
        build_nodes(exp, opts, filename or None, aio, detect_zeroes, host)
    table.add(interface, bus, unit, ident)
    return exp


def _stats_intervals(opts: dict[str, Any]) -> list[int]:
    keys = sorted((k for k in opts if k.startswith("stats-intervals.")), key=lambda k: (len(k), k))
    out = []
    for i, key in enumerate(keys):
        if key != f"stats-intervals.{i}":
            raise OptionError(f"Invalid option {key}")
        out.append(get_number(opts, key, 0))
    return out


def _error_action(value: str, *, read: bool) -> str:
    if value in ("ignore", "stop", "report") or (value == "enospc" and not read):
        return value
    raise OptionError(f"'{value}' invalid {'read' if read else 'write'} error action")
