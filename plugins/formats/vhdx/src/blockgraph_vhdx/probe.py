"""vhdx's probe, importable without the driver (probing runs on every image opened without -f)."""

FILE_SIGNATURE = b"vhdxfile"


def probe(header: bytes, filename: str) -> int:
    """QEMU's vhdx_probe: the file type identifier's signature."""
    return 100 if header[:8] == FILE_SIGNATURE else 0
