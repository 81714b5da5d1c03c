"""-drive addressing (QEMU's bus/unit/index numbering and default ids), shortcuts, -device and whole
command lines."""

from __future__ import annotations

import pytest
from blockgraph.cmdline import DriveError, DriveTable, expand_drive, shortcut_to_drive
from blockgraph.cmdline.commandline import CommandLineError, parse_command_line
from blockgraph.cmdline.legacy import default_id, index_to_address


def ids(*lines: str) -> list[tuple[str, int, int]]:
    table = DriveTable()
    out = []
    for line in lines:
        exp = expand_drive(line, table)
        out.append((exp.id, exp.bus, exp.unit))
    return out


def test_ide_fills_units_then_buses() -> None:
    assert ids("file=a", "file=b", "file=c,media=cdrom", "file=d") == [
        ("ide0-hd0", 0, 0), ("ide0-hd1", 0, 1), ("ide1-cd0", 1, 0), ("ide1-hd1", 1, 1)]


def test_index_maps_to_bus_and_unit() -> None:
    assert index_to_address("ide", 3) == (1, 1)
    assert index_to_address("scsi", 12) == (1, 5)
    assert index_to_address("virtio", 5) == (0, 5)
    assert ids("file=a,index=3", "file=b", "file=c,if=scsi,index=8") == [
        ("ide1-hd1", 1, 1), ("ide0-hd0", 0, 0), ("scsi1-hd1", 1, 1)]


def test_default_ids_per_interface() -> None:
    assert default_id("ide", 1, 0, "cdrom") == "ide1-cd0"
    assert default_id("scsi", 0, 3, "disk") == "scsi0-hd3"
    assert ids("file=a,if=virtio", "file=b,if=virtio", "if=none", "file=f,if=floppy", "file=p,if=pflash") == [
        ("virtio0", 0, 0), ("virtio1", 0, 1), ("none0", 0, 0), ("floppy0", 0, 0), ("pflash0", 0, 0)]


def test_named_drives_take_numbers_too() -> None:
    assert ids("file=a,if=none,id=s1", "if=none") == [("s1", 0, 0), ("none1", 0, 1)]


def test_taken_address_and_duplicate_id() -> None:
    table = DriveTable()
    expand_drive("file=a,index=0", table)
    with pytest.raises(DriveError, match=r"^drive with bus=0, unit=0 \(index=0\) exists$"):
        expand_drive("file=b,index=0", table)
    expand_drive("file=a,if=none,id=x", table)
    with pytest.raises(DriveError, match=r"^Duplicate ID 'x' for drive$"):
        expand_drive("file=b,if=none,id=x", table)


def test_shortcuts() -> None:
    assert shortcut_to_drive("-hda", "a,b.img") == "index=0,media=disk,file=a,,b.img"
    assert shortcut_to_drive("-cdrom", "x.iso") == "index=2,media=cdrom,file=x.iso"
    assert shortcut_to_drive("-fdb", "f.img") == "if=floppy,index=1,file=f.img"
    cl = parse_command_line(["-hda", "a.img", "-hdb", "b.img", "-cdrom", "c.iso", "-snapshot"])
    assert [(e.id, e.snapshot) for e in cl.drives] == [("ide0-hd0", True), ("ide0-hd1", True), ("ide1-cd0", True)]


def test_cdrom_collides_with_hdc() -> None:
    with pytest.raises(CommandLineError) as info:
        parse_command_line(["-hdc", "a.img", "-cdrom", "c.iso"])
    assert str(info.value) == "-cdrom c.iso: drive with bus=1, unit=0 (index=2) exists"


def test_device_attaches_to_if_none_drive() -> None:
    cl = parse_command_line(["-drive", "file=a.img,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0,id=v0"])
    assert cl.drives[0].device == {"driver": "virtio-blk-pci", "drive": "d0", "id": "v0"}


@pytest.mark.parametrize(("argv", "message"), [
    (["-drive", "file=a.img,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0", "-device", "ide-hd,drive=d0"],
     "-device ide-hd,drive=d0: Drive 'd0' is already in use by another device"),
    (["-drive", "file=a.img,id=d0", "-device", "virtio-blk-pci,drive=d0"],
     "-device virtio-blk-pci,drive=d0: Drive 'd0' is already in use because it has been automatically "
     "connected to another device (did you need 'if=none' in the drive options?)"),
    (["-device", "virtio-blk-pci,drive=nope"],
     "-device virtio-blk-pci,drive=nope: Property 'virtio-blk-device.drive' can't find value 'nope'"),
    (["-drive", "file=a.img,if=scsi"], "-drive file=a.img,if=scsi: machine type does not support if=scsi,bus=0,unit=0"),
    (["-drive", "file=a.img,index=4"], "-drive file=a.img,index=4: machine type does not support if=ide,bus=2,unit=0"),
    (["-drive", "file=a.img,if=floppy,unit=2"],
     "-drive file=a.img,if=floppy,unit=2: machine type does not support if=floppy,bus=0,unit=2"),
    (["-drive", "file=a.img,readonly=on"], "Block node is read-only"),
    (["-drive", "file=a.img,id=a", "-drive", "file=b.img,id=b,unit=9", "-drive", "file=c.img,id=a"],
     "-drive file=c.img,id=a: Duplicate ID 'a' for drive"),
    (["-foo"], "-foo: invalid option"),
    (["-drive"], "-drive: requires an argument"),
])
def test_command_line_refusals(argv: list[str], message: str) -> None:
    with pytest.raises(CommandLineError) as info:
        parse_command_line(argv)
    assert str(info.value) == message


def test_other_machines_and_pasted_command_lines() -> None:
    cl = parse_command_line(["qemu-system-x86_64", "-S", "-m", "1G", "-nodefaults", "-machine", "virt",
                             "-drive", "file=a.img,if=scsi"])
    assert cl.machine == "virt" and cl.drives[0].device["driver"] == "scsi-hd"
