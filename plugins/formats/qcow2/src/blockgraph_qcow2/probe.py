"""qcow2's probe, importable without the driver (probing runs on every image opened without -f)."""

import struct

from .constants import MAGIC


def probe(header: bytes, filename: str) -> int:
    """QEMU's qcow2_probe: the magic and a version of at least 2."""
    if len(header) >= 8 and header[:4] == MAGIC and struct.unpack_from(">I", header, 4)[0] >= 2:
        return 100
    return 0
