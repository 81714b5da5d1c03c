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

import copy
from collections.abc import Callable
from typing import Any

import attrs

from ..driver import DriverKind
from ..errors import BlockGraphError, OptionError
from ..options import flatten, merge, option_fields, parse_json, unflatten
from ..plugins import KNOWN_DRIVERS, dist_for
from ..session import PROBE_BYTES
from . import legacy, throttle
from .qemuopts import get_bool, get_number, parse_opts

Warn = Callable[[str], None]
PROBE = "probe"  # the format node's driver when the format is left to probing at open time
TEMPORARY = "(temporary)"  # the overlay file of snapshot=on, created when the drive is opened

CACHE_MODES = {  # cache= -> (cache.writeback, cache.direct, cache.no-flush), bdrv_parse_cache_mode
    "writeback": (True, False, False), "none": (True, True, False), "off": (True, True, False),
    "writethrough": (False, False, False), "directsync": (False, True, False), "unsafe": (True, False, True),
}
AIO_MODES = ("threads", "native", "io_uring")
DISCARD_MODES = ("ignore", "off", "unmap", "on")
DETECT_ZEROES = ("off", "on", "unmap")
POSIX_PROTOCOLS = ("file", "host_device", "host_cdrom")
NODE_KEYS = ("driver", "node-name", "read-only", "auto-read-only", "force-share", "cache.direct",
             "cache.no-flush", "discard", "detect-zeroes")


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
        _build_nodes(exp, opts, filename or None, aio, detect_zeroes, host)
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


# ------------------------------------------------------------------ the node tree


def _build_nodes(exp: DriveExpansion, opts: dict[str, Any], filename: str | None, aio: str | None,
                 detect_zeroes: str, host: Any) -> None:
    for key in ("cache.direct", "cache.no-flush", "auto-read-only", "force-share"):
        if key in opts:
            opts[key] = get_bool(opts, key, False)
    tree: dict[str, Any] = unflatten(opts)
    if isinstance(tree.get("file"), list):  # file.0=... is just an option named "0" to QEMU
        tree["file"] = {str(i): v for i, v in enumerate(tree["file"])}
    if filename is not None and filename.startswith("json:"):
        tree = merge(parse_json(filename[5:], "json: filename"), tree)  # separate options win
        filename = None
    driver = tree.pop("driver", None)
    if driver is None and filename is None and not isinstance(tree.get("file"), dict):
        raise OptionError("Must specify either driver or file")
    kind = _kind(host, driver) if driver is not None else DriverKind.FORMAT
    ro = exp.backend["read-only"]
    base = {"read-only": ro, "auto-read-only": True,
            "cache": {"direct": False, "no-flush": False}, "discard": "ignore"}
    top = merge(base, tree)
    _check_common(top)
    names = _Names(exp)
    if kind is DriverKind.PROTOCOL:
        top["driver"] = driver
        if filename is not None:
            top.update(_protocol_options(host, driver, filename))
        proto = top
    else:
        file_spec = top.pop("file", None)
        if isinstance(file_spec, str) and filename is None:
            file_spec = {"node-ref": file_spec}
        file_spec = dict(file_spec or {})
        if filename is not None:
            pdrv = file_spec.get("driver") or _protocol_for(host, filename)
            file_spec = merge({"driver": pdrv, **_protocol_options(host, pdrv, filename)}, file_spec)
        if "node-ref" not in file_spec and "driver" not in file_spec and "filename" in file_spec:
            file_spec["driver"] = _protocol_for(host, str(file_spec["filename"]))
        if not file_spec:
            raise OptionError('A block device must be specified for "file"')
        if "node-ref" not in file_spec and "driver" not in file_spec:
            raise OptionError("Must specify either driver or file")
        top["driver"] = driver or PROBE
        exp.probe = driver is None
        proto = _inherit(top, file_spec) if "node-ref" not in file_spec else None
        if proto is not None:
            names.place(proto, "file")
        top["file"] = proto["node-name"] if proto is not None else file_spec["node-ref"]
    if aio is not None and proto is not None and proto.get("driver") in POSIX_PROTOCOLS:
        proto.setdefault("aio", aio)
        if proto["aio"] == "native" and not proto["cache"]["direct"]:
            raise OptionError("aio=native was specified, but it requires cache.direct=on, which was not "
                              "specified.")
    top["detect-zeroes"] = detect_zeroes
    names.place(top, "file" if top is proto else "format")
    _validate(host, top, proto)
    root = top["node-name"]
    if root == exp.id:
        raise OptionError(f"Device name '{exp.id}' conflicts with an existing node name")
    if exp.snapshot:
        root = _temp_overlay(exp, top, proto, names)
    if exp.backend["copy-on-read"]:
        cor = {"driver": "copy-on-read", "file": root}
        names.place(cor, "cor")
        exp.requires.append("copy-on-read")
        root = cor["node-name"]
    exp.backend["root"] = root


class _Names:
    """Node names for the -blockdev form: the user's, or ``<drive id>-<role>`` made up here."""

    def __init__(self, exp: DriveExpansion) -> None:
        self.exp = exp

    def place(self, node: dict[str, Any], role: str) -> None:
        if not node.get("node-name"):
            node["node-name"] = f"{self.exp.id}-{role}"
            self.exp.generated.add(node["node-name"])
        node_name = node.pop("node-name")
        ordered = {"driver": node.pop("driver"), "node-name": node_name, **node}
        node.clear()
        node.update(ordered)
        self.exp.blockdevs.append(node)


def _inherit(parent: dict[str, Any], child: dict[str, Any], *, cow: bool = False) -> dict[str, Any]:
    """The child's options with what it inherits from the parent made explicit (bdrv_inherited_options)."""
    child = copy.deepcopy(child)
    pcache = parent.get("cache", {})
    cache = child.setdefault("cache", {})
    cache.setdefault("direct", pcache.get("direct", False))
    cache.setdefault("no-flush", pcache.get("no-flush", False))
    if "force-share" in parent:
        child.setdefault("force-share", parent["force-share"])
    if cow:
        child.setdefault("read-only", True)
        child.setdefault("auto-read-only", False)
    else:
        child.setdefault("read-only", parent.get("read-only", False))
        child.setdefault("auto-read-only", parent.get("auto-read-only", False))
    child.setdefault("discard", "unmap")  # lower layers may unmap; the top applies the policy
    _check_common(child)
    return child


def _check_common(node: dict[str, Any]) -> None:
    if str(node.get("discard", "ignore")) not in DISCARD_MODES:
        raise OptionError("Invalid discard option")
    name = node.get("node-name")
    if name is not None:
        from .qemuopts import id_wellformed

        if not id_wellformed(str(name)):
            raise OptionError(f"Invalid node-name: '{name}'")


def _temp_overlay(exp: DriveExpansion, top: dict[str, Any], proto: dict[str, Any] | None,
                  names: _Names) -> str:
    """snapshot=on: a temporary qcow2 overlay on top; the image below becomes its read-only backing."""
    for node in (top, proto):  # opened with the backing role (bdrv_backing_options)
        if node is not None:
            node["read-only"] = True
            node["auto-read-only"] = False
    overlay_file = {"driver": "file", "filename": TEMPORARY, "read-only": exp.backend["read-only"],
                    "auto-read-only": False, "cache": {"direct": False, "no-flush": True}, "discard": "unmap"}
    names.place(overlay_file, "snapshot-file")
    overlay = {"driver": "qcow2", "read-only": exp.backend["read-only"], "auto-read-only": False,
               "cache": {"direct": False, "no-flush": True}, "discard": top.get("discard", "ignore"),
               # detect-zeroes belongs to whatever node the backend ends up on: the overlay
               "detect-zeroes": top.pop("detect-zeroes", "off"),
               "file": overlay_file["node-name"], "backing": top["node-name"]}
    names.place(overlay, "snapshot")
    exp.requires.append("qcow2")
    return overlay["node-name"]


# ------------------------------------------------------------------ drivers


def probe_local(exp: DriveExpansion, host: Any) -> tuple[str, str] | None:
    """Fill in the format of a drive left to probing when its image is a local file: (format, filename).

    Reads the first bytes with plain file I/O, so nothing is opened or locked.
    """
    if not exp.probe:
        return None
    top = next((bd for bd in exp.blockdevs if bd["driver"] == PROBE), None)
    proto = None if top is None else next((bd for bd in exp.blockdevs if bd["node-name"] == top.get("file")), None)
    if proto is None or proto["driver"] != "file":
        return None
    try:
        with open(str(proto.get("filename")), "rb") as f:
            header = f.read(PROBE_BYTES)
    except OSError:
        return None
    top["driver"] = host.probe(header, str(proto["filename"]))
    return top["driver"], str(proto["filename"])


def _kind(host: Any, driver: str) -> DriverKind:
    if host is None:
        return DriverKind.PROTOCOL if driver in (*POSIX_PROTOCOLS, "nbd", "null-co", "null-aio") \
            else DriverKind.FORMAT
    return host.driver_entry(driver).meta["kind"]  # DriverNotFound names the distribution


def _protocol_for(host: Any, filename: str) -> str:
    if host is None:
        return "file"
    try:
        return host.protocol_for(filename) or "file"
    except OptionError:
        prefix = filename.partition(":")[0]
        if prefix in KNOWN_DRIVERS:
            raise OptionError(f"Unknown protocol '{prefix}'; it is provided by {dist_for(prefix)}, "
                              f"which is not installed (pip install {dist_for(prefix)})") from None
        raise OptionError(f"Unknown protocol '{prefix}'") from None


def _protocol_options(host: Any, driver: str, filename: str) -> dict[str, Any]:
    if host is not None:
        try:
            cls = host.driver(driver)
        except BlockGraphError:
            cls = None
        parse = getattr(cls, "parse_filename", None)
        if parse is not None:
            return dict(parse(filename))
    return {"filename": filename}


def _validate(host: Any, top: dict[str, Any], proto: dict[str, Any] | None) -> None:
    """Options no driver takes are refused with QEMU's text, the lower node first as QEMU opens it."""
    if host is None:
        return
    for node in (proto, top):
        if node is None or (node is top and top["driver"] == PROBE):
            continue
        try:
            cls = host.driver(node["driver"])
        except BlockGraphError:
            continue
        known = set(option_fields(cls.Options)) | set(NODE_KEYS)
        children = set(getattr(cls, "child_options", ()))
        for key in flatten({k: v for k, v in node.items() if k not in children}):
            if key not in known:
                what = "protocol" if DriverKind(cls.kind) is DriverKind.PROTOCOL else "format"
                verb = "doesn't support" if what == "protocol" else "does not support"
                raise OptionError(f"Block {what} '{node['driver']}' {verb} the option '{key}'")
