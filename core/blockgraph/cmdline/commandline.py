"""A whole QEMU command line's block part: ``-drive``, its shortcuts, ``-snapshot``, ``-blockdev``,
``-device ...,drive=`` and ``-machine``, checked in QEMU's order. Other options are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from ..errors import BlockGraphError, OptionError
from ..options import parse_blockdev
from . import legacy
from .drive import DriveError, DriveExpansion, expand_drive, parse_drive
from .qemuopts import parse_opts

# qemu-system options that take an argument / take none, skipped when a whole command line is pasted.
_SKIP_WITH_ARG = {"-m", "-smp", "-cpu", "-accel", "-display", "-qmp", "-monitor", "-serial", "-name", "-boot",
                  "-netdev", "-nic", "-net", "-vga", "-k", "-chardev", "-object", "-kernel", "-initrd", "-append",
                  "-bios", "-L", "-pidfile", "-D", "-d", "-global", "-rtc", "-uuid", "-vnc", "-spice", "-mon",
                  "-usbdevice", "-incoming", "-trace", "-icount", "-numa", "-fsdev", "-virtfs", "-sandbox",
                  "-runas", "-parallel", "-device-help", "-readconfig", "-action"}
_SKIP_FLAGS = {"-S", "-nodefaults", "-enable-kvm", "-no-reboot", "-no-shutdown", "-daemonize", "-nographic",
               "-no-user-config", "-no-hpet", "-no-acpi", "-s", "-full-screen", "-usb"}
_WITH_ARG = {"-drive", "-blockdev", "-device", "-machine", "-M", *legacy.SHORTCUT_OPTIONS}


class CommandLineError(BlockGraphError):
    """A refused command line; ``location`` is the option as given (``-drive TEXT``), or None."""

    def __init__(self, reason: str, location: str | None = None) -> None:
        self.reason, self.location = reason, location
        super().__init__(f"{location}: {reason}" if location else reason)


@attrs.define
class CommandLine:
    drives: list[DriveExpansion] = attrs.Factory(list)
    blockdevs: list[dict[str, Any]] = attrs.Factory(list)
    devices: list[dict[str, Any]] = attrs.Factory(list)
    machine: str = "pc"
    locations: dict[str, str] = attrs.Factory(dict)  # drive id -> option as given


def _options(argv: list[str]) -> tuple[list[tuple[str, str]], bool, str]:
    items: list[tuple[str, str]] = []
    snapshot, machine = False, "pc"
    args = list(argv)
    if args and not args[0].startswith("-"):
        args.pop(0)  # the program name of a pasted qemu-system command line
    i = 0
    while i < len(args):
        opt = args[i]
        name = "-" + opt.lstrip("-") if opt.startswith("--") else opt
        if name in _WITH_ARG or name in _SKIP_WITH_ARG:
            if i + 1 >= len(args):
                raise CommandLineError("requires an argument", opt)
            value = args[i + 1]
            i += 2
            if name in ("-machine", "-M"):
                machine = parse_opts(value, implied_key="type")[1].get("type", machine)
            elif name in _WITH_ARG:
                items.append((name, value))
            continue
        if name == "-snapshot":
            snapshot = True
        elif name not in _SKIP_FLAGS:
            raise CommandLineError("invalid option", opt)
        i += 1
    return items, snapshot, machine


def parse_command_line(argv: list[str], host: Any = None, *, warn: Callable[[str], None] | None = None,
                       check_machine: bool = True) -> CommandLine:
    """Expand every drive of ``argv`` (qemu-system syntax); errors are :class:`CommandLineError`."""
    items, snapshot, machine = _options(argv)
    cl = CommandLine(machine=machine)
    parsed = []
    ids: set[str] = set()
    for opt, value in items:  # QEMU parses every -drive (and checks ids) before creating any
        if opt not in ("-drive", *legacy.SHORTCUT_OPTIONS):
            continue
        loc = f"{opt} {value}"
        text = value if opt == "-drive" else legacy.shortcut_to_drive(opt, value)
        try:
            p = parse_drive(text, warn=_located(warn, loc))
        except DriveError as e:
            raise CommandLineError(e.reason, loc) from None
        if p.id is not None:
            if p.id in ids:
                raise CommandLineError(f"Duplicate ID '{p.id}' for drive", loc)
            ids.add(p.id)
        parsed.append((loc, p))
    table = legacy.DriveTable()
    for loc, p in parsed:
        try:
            exp = expand_drive(p, table, host=host, snapshot=snapshot, warn=_located(warn, loc))
        except DriveError as e:
            raise CommandLineError(e.reason, loc) from None
        cl.drives.append(exp)
        cl.locations[exp.id] = loc
    pc = check_machine and (machine == "pc" or machine.startswith("pc-i440fx"))
    if pc:
        for exp in cl.drives:  # the board's own devices refuse read-only IDE disks at creation
            if exp.interface == "ide" and exp.media == "disk" and exp.backend["read-only"] and exp.root:
                raise CommandLineError("Block node is read-only")
    for opt, value in items:
        loc = f"{opt} {value}"
        try:
            if opt == "-blockdev":
                cl.blockdevs.append(parse_blockdev(value))
            elif opt == "-device":
                _device(cl, value)
        except OptionError as e:
            raise CommandLineError(e.reason, loc) from None
    if pc:
        for exp in cl.drives:
            msg = legacy.pc_check(exp.interface, exp.bus, exp.unit)
            if msg:
                raise CommandLineError(msg, cl.locations[exp.id])
    return cl


def _located(warn: Callable[[str], None] | None, loc: str) -> Callable[[str], None] | None:
    return None if warn is None else (lambda msg: warn(f"{loc}: {msg}"))


def _device(cl: CommandLine, text: str) -> None:
    ident, opts = parse_opts(text, implied_key="driver")
    device: dict[str, Any] = dict(opts)
    if ident is not None:
        device["id"] = ident
    ref = opts.get("drive")
    if ref is None:
        cl.devices.append(device)
        return
    exp = next((e for e in cl.drives if e.id == ref), None)
    if exp is None:
        if any(bd.get("node-name") == ref for bd in cl.blockdevs):
            cl.devices.append(device)
            return
        qdev = {"virtio-blk-pci": "virtio-blk-device"}.get(str(opts.get("driver")), opts.get("driver"))
        raise OptionError(f"Property '{qdev}.drive' can't find value '{ref}'")
    if exp.interface != "none":
        raise OptionError(f"Drive '{ref}' is already in use because it has been automatically connected to "
                          f"another device (did you need 'if=none' in the drive options?)")
    if exp.device is not None:
        raise OptionError(f"Drive '{ref}' is already in use by another device")
    exp.device = device
    exp.backend["removable"] = legacy.device_removable(str(opts.get("driver")))
