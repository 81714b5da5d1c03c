"""``blockgraph drive``: what QEMU makes of ``-drive`` lines (and ``-hda``, ``-cdrom``, ``-snapshot``,
``-device ...,drive=``): the node tree, the BlockBackend and the device of each drive.

The rest of the arguments are qemu-system's, so a whole command line can be pasted
(options unrelated to block devices are skipped). By default every drive is also
opened (read, never written) to check it as QEMU would; ``--no-open`` only expands.
Errors read as QEMU's, with our program name: ``blockgraph drive: -drive TEXT: message``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from ..cmdline.commandline import CommandLine, CommandLineError, parse_command_line
from ..cmdline.drive import PROBE, DriveExpansion, probe_local
from ..cmdline.open import open_drive
from ..errors import BlockGraphError
from ..plugins import PluginHost, dist_for
from ..session import RAW_PROBE_WARNING, Session

PROG = "blockgraph drive"
USAGE = f"""usage: {PROG} [--output=human|json] [--no-open] [-drive OPTS]... [-hda FILE] [-cdrom FILE]
       [-snapshot] [-device OPTS]... [-blockdev OPTS]... [-machine TYPE] [other qemu-system options]

Shows the -blockdev nodes, the BlockBackend and the device each -drive gives, as QEMU builds them.
  --output=json   the nodes in -blockdev JSON form, with backend and device objects
  --no-open       expand only; by default each drive is opened (never written) to check it"""
CHILDREN = ("file", "backing", "data-file")


def main(argv: list[str], host: PluginHost) -> int:
    output, do_open, rest = "human", True, []
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in ("-h", "--help", "-help"):
            print(USAGE)
            return 0
        if a.startswith("--output"):
            output = a.partition("=")[2] if "=" in a else (args.pop(0) if args else "")
            if output not in ("human", "json"):
                print(f"{PROG}: --output must be 'human' or 'json'", file=sys.stderr)
                return 1
        elif a == "--no-open":
            do_open = False
        else:
            rest.append(a)
            if a.lstrip("-") in ("drive", "device", "blockdev", "machine", "M", "hda", "hdb", "hdc", "hdd",
                                 "cdrom", "fda", "fdb", "sd", "mtdblock", "pflash") and args:
                rest.append(args.pop(0))  # its argument, even when it looks like our own option

    def warn(msg: str) -> None:
        print(f"{PROG}: {msg}", file=sys.stderr)

    try:
        cl = parse_command_line(rest, host, warn=warn)
    except CommandLineError as e:
        warn(str(e))
        return 1
    for exp in cl.drives:
        _probe(host, exp)
    if output == "json":
        print(json.dumps({"drives": [exp.to_json() for exp in cl.drives], "blockdevs": cl.blockdevs,
                          "devices": cl.devices}, indent=4))
    else:
        _print_human(cl, host)
    if not do_open:
        return 0
    try:
        asyncio.run(_open_all(host, cl, warn))
    except CommandLineError as e:
        warn(str(e))
        return 1
    return 0


def _probe(host: PluginHost, exp: DriveExpansion) -> None:
    probed = probe_local(exp, host)
    if probed is not None and probed[0] == "raw" and not exp.backend["read-only"] and not exp.snapshot:
        print(RAW_PROBE_WARNING.format(probed[1]), file=sys.stderr)  # unprefixed, as QEMU prints it


async def _open_all(host: PluginHost, cl: CommandLine, warn: Any) -> None:
    session = Session(plugins=host, warn=lambda msg: None)
    try:
        for exp in cl.drives:
            missing = [d for d in exp.requires if d not in host.drivers]
            if missing:
                dist = dist_for(missing[0])
                why = {"throttle": "throttling", "copy-on-read": "copy-on-read=on", "qcow2": "snapshot=on"}
                raise CommandLineError(f"{why.get(missing[0], missing[0])} needs the '{missing[0]}' driver, "
                                       f"provided by {dist}, which is not installed (pip install {dist})",
                                       cl.locations[exp.id])
            try:
                await open_drive(session, exp)
            except BlockGraphError as e:
                raise CommandLineError(str(e), cl.locations[exp.id]) from None
    finally:
        await session.close()


# ------------------------------------------------------------------ human output


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def _flat(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        elif v is not None and v != []:
            out.append(f"{prefix}{k}={_value(v)}")
    return out


def _print_human(cl: CommandLine, host: PluginHost) -> None:
    for n, exp in enumerate(cl.drives):
        if n:
            print()
        addr = f"if={exp.interface} bus={exp.bus} unit={exp.unit}"
        if exp.index is not None:
            addr += f" index={exp.index}"
        print(f"drive {exp.id}: {addr} media={exp.media}")
        if exp.device is not None:
            dev = dict(exp.device)
            print(f"  device: {','.join([str(dev.pop('driver')), *_flat(dev)])}")
        else:
            print("  device: none (attach one with -device ...,drive=" + exp.id + ")")
        be = exp.backend
        keys = ("read-only", "write-cache", "rerror", "werror", "removable")
        print(f"  backend {exp.id}: " + " ".join(f"{k}={_value(be[k])}" for k in keys))
        if be["throttle"]:
            limits = " ".join(f"{k}={v}" for k, v in be["throttle"]["limits"].items())
            print(f"    throttle: group={be['throttle']['group']} {limits}")
        if exp.root is None:
            print("  medium: none (empty drive)")
        else:
            _print_node(exp, exp.root, "root", 1)
        if exp.probe:
            print("  format: " + ("probed when the drive is opened" if any(bd["driver"] == PROBE for bd in
                                                                          exp.blockdevs) else "probed"))
        missing = [d for d in exp.requires if d not in host.drivers]
        for d in missing:
            print(f"  needs: {dist_for(d)} (not installed) for the '{d}' driver")


def _print_node(exp: DriveExpansion, name: str, edge: str, depth: int) -> None:
    node = exp.node(name)
    opts = {k: v for k, v in node.items() if k not in ("driver", "node-name", *CHILDREN)}
    label = name if name not in exp.generated else f"{name}, generated"
    detail = " ".join(_flat(opts))
    print(f"{'  ' * depth}{edge}: {node['driver']} [{label}] {detail}".rstrip())
    for child in CHILDREN:
        ref = node.get(child)
        if isinstance(ref, str):
            try:
                _print_node(exp, ref, child, depth + 1)
            except KeyError:
                print(f"{'  ' * (depth + 1)}{child}: node '{ref}'")
