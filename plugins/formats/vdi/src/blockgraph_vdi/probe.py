"""vdi's probe, importable without the driver (probing runs on every image opened without -f)."""

SIGNATURE = 0xBEDA107F
HEADER_SIZE = 512


def probe(header: bytes, filename: str) -> int:
    """QEMU's vdi_probe: the signature at offset 64 of a whole header."""
    if len(header) < HEADER_SIZE:
        return 0
    return 100 if int.from_bytes(header[64:68], "little") == SIGNATURE else 0
