"""A backing file name with a NUL byte in it ends at the NUL, as QEMU reads it (a C string)."""

from __future__ import annotations

import struct
from pathlib import Path

from blockgraph.testing.peers import bg, needs_qemu, run


@needs_qemu
def test_backing_name_ends_at_a_nul_byte_as_in_qemu(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "1M")
    run("qemu-io", "-c", "write -P 0x42 0 4k", base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    data = bytearray(top.read_bytes())
    offset = struct.unpack_from(">Q", data, 8)[0]
    name = b"base.qcow2\0trailing junk"
    data[offset:offset + len(name)] = name
    struct.pack_into(">I", data, 16, len(name))
    top.write_bytes(data)
    want = [line for line in run("qemu-img", "info", top).stdout.splitlines() if line.startswith("backing")]
    got = [line for line in bg("img", "info", top).stdout.splitlines() if line.startswith("backing")]
    assert got == want
    assert want[0].startswith("backing file: base.qcow2 (actual path: ") and want[1] == "backing file format: qcow2"
    assert "Pattern verification failed" not in bg("io", "-r", "-c", "read -P 0x42 0 4k", top).stdout
