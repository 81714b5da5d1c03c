"""``-drive`` addressing as QEMU does it: interfaces, bus/unit/index numbering, default ids,
the devices a drive implies, the ``-hda``..``-hdd``/``-cdrom``/``-fda``/``-snapshot`` shortcuts,
and what the ``pc`` machine accepts.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..errors import OptionError

INTERFACES = ("none", "ide", "scsi", "floppy", "pflash", "mtd", "sd", "virtio", "xen")
# Units per bus; 0 means one bus with any number of units. QEMU calls this mapping ABI.
MAX_DEVS = {"ide": 2, "scsi": 7}
DEFAULT_INTERFACE = "ide"  # the pc and q35 machines' block_default_type
# Interfaces that take rerror/werror (the others have no error policy in their devices).
ERROR_POLICY_INTERFACES = ("ide", "scsi", "virtio", "none")


def index_to_address(interface: str, index: int) -> tuple[int, int]:
    max_devs = MAX_DEVS.get(interface, 0)
    return (index // max_devs, index % max_devs) if max_devs else (0, index)


@attrs.define
class DriveTable:
    """The drives of one command line: which addresses and ids are taken (QEMU's drive list)."""

    used: dict[tuple[str, int, int], str] = attrs.Factory(dict)
    ids: set[str] = attrs.Factory(set)

    def assign(self, interface: str, bus: int, unit: int, index: int) -> tuple[int, int]:
        """Pick bus and unit as drive_new does; ``unit`` -1 means the first free one."""
        max_devs = MAX_DEVS.get(interface, 0)
        if index != -1:
            if bus != 0 or unit != -1:
                raise OptionError("index cannot be used with bus and unit")
            bus, unit = index_to_address(interface, index)
        if unit == -1:
            unit = 0
            while (interface, bus, unit) in self.used:
                unit += 1
                if max_devs and unit >= max_devs:
                    unit -= max_devs
                    bus += 1
        if max_devs and unit >= max_devs:
            raise OptionError(f"unit {unit} too big (max is {max_devs - 1})")
        if (interface, bus, unit) in self.used:
            raise OptionError(f"drive with bus={bus}, unit={unit} (index={index}) exists")
        return bus, unit

    def claim_id(self, ident: str) -> None:
        if ident in self.ids:
            raise OptionError(f"Duplicate ID '{ident}' for drive")

    def add(self, interface: str, bus: int, unit: int, ident: str) -> None:
        self.used[(interface, bus, unit)] = ident
        self.ids.add(ident)


def default_id(interface: str, bus: int, unit: int, media: str) -> str:
    """``ide0-hd0``, ``ide1-cd0``, ``scsi0-hd3``, ``virtio0``, ``floppy1``, ``none0`` ..."""
    mediastr = ""
    if interface in ("ide", "scsi"):
        mediastr = "-cd" if media == "cdrom" else "-hd"
    if MAX_DEVS.get(interface):
        return f"{interface}{bus}{mediastr}{unit}"
    return f"{interface}{mediastr}{unit}"


def device_for(interface: str, bus: int, unit: int, media: str, ident: str) -> dict[str, Any] | None:
    """The device a drive gets without ``-device`` (board-created, or virtio-blk queued by drive_new)."""
    cd = media == "cdrom"
    if interface == "ide":
        return {"driver": "ide-cd" if cd else "ide-hd", "drive": ident, "bus": f"ide.{bus}", "unit": unit}
    if interface == "scsi":
        return {"driver": "scsi-cd" if cd else "scsi-hd", "drive": ident, "bus": f"scsi{bus}.0", "scsi-id": unit}
    if interface == "virtio":
        return {"driver": "virtio-blk-pci", "drive": ident}
    if interface == "floppy":
        return {"driver": "floppy", "drive": ident, "unit": unit}
    if interface == "pflash":
        return {"driver": "cfi.pflash01", "drive": ident, "id": f"system.flash{unit}"}
    if interface == "sd":
        return {"driver": "sd-card", "drive": ident}
    if interface == "xen":
        return {"driver": "xen-cdrom" if cd else "xen-disk", "drive": ident, "vdev": f"xvd{chr(97 + unit)}"}
    if interface == "mtd":
        return {"driver": "mtd (board-specific)", "drive": ident}
    return None


def removable(interface: str, media: str) -> bool:
    """query-block's ``removable``: media that can change, or no device to say otherwise."""
    return interface in ("none", "floppy", "sd") or (media == "cdrom" and interface in ("ide", "scsi", "xen"))


REMOVABLE_DEVICES = ("ide-cd", "scsi-cd", "floppy", "sd-card", "xen-cdrom", "usb-storage")


def device_removable(driver: str) -> bool:
    """``removable`` once ``-device DRIVER,drive=...`` claims an ``if=none`` drive."""
    return driver in REMOVABLE_DEVICES


# ------------------------------------------------------------------ shortcuts

SHORTCUTS = {"-hda": 0, "-hdb": 1, "-hdc": 2, "-hdd": 3}


def shortcut_to_drive(option: str, value: str) -> str:
    """The ``-drive`` text QEMU builds for ``-hda F``, ``-cdrom F``, ``-fda F`` ... (``,`` in F is doubled)."""
    file = value.replace(",", ",,")
    if option in SHORTCUTS:
        return f"index={SHORTCUTS[option]},media=disk,file={file}"
    if option == "-cdrom":
        return f"index=2,media=cdrom,file={file}"
    if option in ("-fda", "-fdb"):
        return f"if=floppy,index={0 if option == '-fda' else 1},file={file}"
    if option == "-sd":
        return f"if=sd,file={file}"
    if option == "-mtdblock":
        return f"if=mtd,file={file}"
    if option == "-pflash":
        return f"if=pflash,file={file}"
    raise OptionError(f"unknown drive shortcut '{option}'")


SHORTCUT_OPTIONS = ("-hda", "-hdb", "-hdc", "-hdd", "-cdrom", "-fda", "-fdb", "-sd", "-mtdblock", "-pflash")


# ------------------------------------------------------------------ machine

def pc_check(interface: str, bus: int, unit: int) -> str | None:
    """The drives QEMU's ``pc`` machine leaves unclaimed (drive_check_orphans), or None."""
    ok = (interface in ("none", "virtio")
          or (interface == "ide" and bus < 2)
          or (interface == "floppy" and bus == 0 and unit < 2)
          or (interface == "pflash" and bus == 0 and unit < 2))
    return None if ok else f"machine type does not support if={interface},bus={bus},unit={unit}"
