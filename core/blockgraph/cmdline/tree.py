"""The node tree of one ``-drive``, as QEMU's bdrv_open builds it from the options left over.

Protocol node (filename prefix, ``file`` by default), format node (given, or ``probe``),
the temporary overlay of ``snapshot=on`` and the copy-on-read filter; every node carries the
values it would inherit, so the list also works as separate ``-blockdev`` definitions.

QEMU 7.2 implements ``copy-on-read=on`` as a flag on the top node; blockgraph's backend has no
copy-on-read path of its own, so the expansion uses the ``copy-on-read`` filter node that QEMU
documents as the ``-blockdev`` equivalent (plugin blockgraph-copy-on-read).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from ..driver import DriverKind
from ..errors import BlockGraphError, OptionError
from ..options import flatten, merge, option_fields, parse_json, unflatten
from ..plugins import KNOWN_DRIVERS, dist_for
from ..session import PROBE_BYTES
from .qemuopts import get_bool, id_wellformed

if TYPE_CHECKING:
    from .drive import DriveExpansion

PROBE = "probe"  # the format node's driver when the format is left to probing at open time
TEMPORARY = "(temporary)"  # the overlay file of snapshot=on, created when the drive is opened
DISCARD_MODES = ("ignore", "off", "unmap", "on")
POSIX_PROTOCOLS = ("file", "host_device", "host_cdrom")
NODE_KEYS = ("driver", "node-name", "read-only", "auto-read-only", "force-share", "cache.direct",
             "cache.no-flush", "discard", "detect-zeroes")


def build_nodes(exp: DriveExpansion, opts: dict[str, Any], filename: str | None, aio: str | None,
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
    if name is not None and not id_wellformed(str(name)):
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
